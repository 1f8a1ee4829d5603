package token

// MaxScopeLen bounds a scope in the header and in a scope caveat.
const MaxScopeLen = 255

// ValidScope reports whether s is a canonical scope: "" (the root, everything)
// or one or more '/'-separated segments, each made of ASCII letters, digits
// and "-_.:@+", none empty, "." or "..". No leading or trailing '/'.
// Canonical form means one name has one spelling, so Within can compare bytes.
func ValidScope(s string) bool {
	if len(s) > MaxScopeLen {
		return false
	}
	seg := 0 // start of the current segment
	for i := 0; i <= len(s); i++ {
		if i < len(s) && s[i] != '/' {
			if !scopeByte(s[i]) {
				return false
			}
			continue
		}
		// End of a segment at i.
		if len(s) == 0 {
			return true
		}
		n := i - seg
		if n == 0 || (n == 1 && s[seg] == '.') || (n == 2 && s[seg] == '.' && s[seg+1] == '.') {
			return false
		}
		seg = i + 1
	}
	return true
}

func scopeByte(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	case c == '-', c == '_', c == '.', c == ':', c == '@', c == '+':
		return true
	}
	return false
}

// Within reports whether scope lies inside parent: parent is the root "",
// or equal to scope, or a prefix of scope that ends on a '/' boundary
// ("svc/a" is within "svc" but "svcx" is not). Both must be valid scopes.
// It does not allocate.
func Within(scope, parent string) bool {
	return ValidScope(parent) && within(scope, parent)
}

// within is Within for a parent already known to be valid (a verified
// capability's scope): the hot path validates only the requested scope.
func within(scope, parent string) bool {
	if !ValidScope(scope) {
		return false
	}
	if parent == "" || scope == parent {
		return true
	}
	return len(scope) > len(parent) && scope[:len(parent)] == parent && scope[len(parent)] == '/'
}
