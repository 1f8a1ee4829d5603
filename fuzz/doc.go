// Package fuzz holds the fuzz targets of the SYPAS codecs (frame and sypas
// payloads). It has no non-test code; the targets live in *_fuzz_test.go:
//
//	FuzzFrameDecode     decoding arbitrary bytes never panics; accepted frames satisfy the header invariants
//	FuzzFrameRoundTrip  decode → encode → decode gives equal frames and the same bytes
//	FuzzFrameStream     a byte stream read in fuzz-chosen chunks yields the same frames and error as decoding it whole
//	FuzzDecodeX         one per payload type: no panic; accepted → re-encode → decode equal
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
