// Package fuzz holds the fuzz targets of everything that reads untrusted
// bytes: the SYPAS codecs (frame and wire payloads), the ring facing a
// hostile producer, bulk regions facing hostile descriptors and ACKs,
// capability tokens, the control-plane handshake and the bridge's two ends
// facing a hostile peer's ring. It has no non-test code; the targets live
// in *_fuzz_test.go:
//
//	FuzzFrameDecode        decoding arbitrary bytes never panics; accepted frames satisfy the header invariants
//	FuzzFrameRoundTrip     decode → encode → decode gives equal frames and the same bytes
//	FuzzFrameStream        a byte stream read in fuzz-chosen chunks yields the same frames and error as decoding it whole
//	FuzzDecodeX            one per payload type: no panic; accepted → re-encode → decode equal
//	FuzzRingConsumer       a consumer over an arbitrary producer slot and data area: no panic, views in the data area, termination, only documented errors
//	FuzzRingHeader         the same over an arbitrary header and control slots, for both ends
//	FuzzRingScribble       an honest producer and consumer with arbitrary scribbles on the region between steps
//	FuzzBulk               a real bulk region fed arbitrary and forged descriptors and ACKs beside honest ones: views inside the region, only outstanding spans released, the allocator whole
//	FuzzTokenParse         token parsing never panics; accepted tokens re-encode to the same bytes
//	FuzzServerHandshake    a kernel facing arbitrary bytes from an attested daemon
//	FuzzServerHandshakeFDs the same, with descriptors attached at arbitrary points
//	FuzzDialHandshake      a daemon facing arbitrary bytes from a kernel
//	FuzzBridgeKernel       a sypas.Server facing arbitrary ring records from a daemon: no panic or hang, every frame it writes decodes, it answers or ends the session with its reason, others are served
//	FuzzBridgeClient       a sypas.Client facing arbitrary ring records from a kernel while a Call waits: no panic, the Call ends by its deadline, Close returns
//
// Run one with
//
//	go test -run '^$' -fuzz '^FuzzFrameDecode$' -fuzztime 5m -parallel 1 ./fuzz/
//
// or all in turn with make fuzz FUZZTIME=5m. Seed corpora are in
// testdata/fuzz/<target>/; they are generated from valid encodings by
//
//	go test ./fuzz/ -run TestWriteSeedCorpus -gen-corpus
//
// and any crash the fuzzer finds is committed there as a regression input.
package fuzz
