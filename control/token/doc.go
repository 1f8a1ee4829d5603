// Package token implements SYPAS capability tokens: compact binary bearer
// tokens chained with HMAC-SHA256 in the macaroon style.
//
// The kernel mints a token for an attested daemon (the subject). Any holder
// may append caveats that narrow the token (fewer rights, a deeper scope, an
// earlier expiry) without the key; nobody can widen it or remove a caveat,
// because each signature is the HMAC of the next caveat keyed by the previous
// signature, and HMAC cannot be run backwards.
//
// Wire layout (all integers little-endian, like the rest of SYPAS):
//
//	offset  width  field
//	0       1      version, always 1
//	1       1      scope length L, 0..MaxScopeLen
//	2       2      reserved, must be zero
//	4       4      key id
//	8       8      token id (random, never 0): the "capability reference" frames carry
//	16      4      subject uid
//	20      4      subject gid
//	24      4      subject pid (0: any process of that uid/gid)
//	28      32     subject executable SHA-256 (all zero: any executable)
//	60      8      rights bitmask
//	68      8      not-before, unix nanoseconds (int64)
//	76      8      expiry, unix nanoseconds (int64), exclusive
//	84      L      scope (see ValidScope)
//	84+L    ...    caveats, 0..MaxCaveats, each: kind (1), length n (1), value (n)
//	end-32  32     signature
//
// Caveat kinds: 1 rights (n=8, uint64, ANDed), 2 expiry (n=8, int64 unix
// nanoseconds, the minimum wins), 3 scope (n=1..MaxScopeLen, must be Within
// the scope in force). Unknown kinds are malformed: verification fails closed.
//
// Signatures: sig0 = HMAC-SHA256(key[key id], header bytes [0, 84+L));
// sig(i+1) = HMAC-SHA256(sig(i), caveat i bytes including kind and length);
// the token ends with the last one.
package token
