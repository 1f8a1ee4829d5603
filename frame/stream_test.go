package frame

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"testing/iotest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// chunkReader returns the data in chunks of the given sizes, cycling.
type chunkReader struct {
	data  []byte
	sizes []int
	i     int
}

func (c *chunkReader) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := c.sizes[c.i%len(c.sizes)]
	c.i++
	n = min(n, len(p), len(c.data))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

func streamOf(t *testing.T, fs []Frame) []byte {
	var b []byte
	for i := range fs {
		var err error
		b, err = fs[i].Append(b)
		require.NoError(t, err)
	}
	return b
}

// readAll reads frames until an error, copying them out of the Reader.
func readAll(r *Reader) ([]Frame, error) {
	var out []Frame
	for {
		f, err := r.ReadFrame()
		if err != nil {
			return out, err
		}
		c := *f
		c.Extension = bytes.Clone(f.Extension)
		c.Payload = bytes.Clone(f.Payload)
		out = append(out, c)
	}
}

func TestReaderChunked(t *testing.T) {
	fs := testFrames()
	stream := streamOf(t, fs)
	want := make([]Frame, len(fs))
	for i := range fs {
		want[i] = normal(fs[i])
	}
	for _, sizes := range [][]int{{1}, {2}, {3, 1, 7}, {47}, {48}, {49}, {4096}, {1 << 20}, {5, 100, 3000, 1}} {
		r := NewReader(&chunkReader{data: stream, sizes: sizes}, Config{})
		got, err := readAll(r)
		require.ErrorIs(t, err, io.EOF, "sizes %v", sizes)
		assert.Equal(t, io.EOF, err, "clean EOF must be io.EOF itself")
		assert.Equal(t, want, got, "sizes %v", sizes)
	}
	r := NewReader(iotest.DataErrReader(bytes.NewReader(stream)), Config{})
	got, err := readAll(r)
	assert.Equal(t, io.EOF, err)
	assert.Equal(t, want, got)
}

func TestReaderEveryCut(t *testing.T) {
	fs := []Frame{
		{Header: Header{Type: TypeRequest, Flags: FlagChecksum, Correlation: 1}, Payload: []byte("first")},
		{Header: Header{Type: TypeResponse, Correlation: 1}, Extension: make([]byte, 8), Payload: []byte("second!")},
	}
	stream := streamOf(t, fs)
	first := fs[0].Len()
	for cut := range len(stream) {
		r := NewReader(iotest.OneByteReader(bytes.NewReader(stream[:cut])), Config{})
		got, err := readAll(r)
		switch cut {
		case 0, first:
			assert.Equal(t, io.EOF, err, "cut at %d", cut)
		default:
			assert.Equal(t, io.ErrUnexpectedEOF, err, "cut at %d", cut)
		}
		assert.Len(t, got, map[bool]int{true: 1, false: 0}[cut >= first], "cut at %d", cut)
		_, again := r.ReadFrame()
		assert.Equal(t, err, again, "errors are sticky")
	}
}

// failAfter fails the test if more than n bytes are read.
type failAfter struct {
	t *testing.T
	r io.Reader
	n int
}

func (f *failAfter) Read(p []byte) (int, error) {
	m, err := f.r.Read(p[:min(len(p), 16)])
	f.n -= m
	if f.n < 0 {
		f.t.Errorf("read %d bytes past the point of rejection", -f.n)
	}
	return m, err
}

func TestReaderGarbage(t *testing.T) {
	good := streamOf(t, []Frame{{Header: Header{Type: TypeHeartbeat}, Payload: make([]byte, 16)}})
	huge := bytes.Clone(good)
	put32(huge[offPayloadLen:], 0x7fffffff)
	v2 := bytes.Clone(good)
	v2[offVersion] = 2
	for _, tc := range []struct {
		name string
		data []byte
		want error
	}{
		{"text", []byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n0123456789"), ErrBadMagic},
		{"afterValidFrame", append(bytes.Clone(good), bytes.Repeat([]byte{0}, 64)...), ErrBadMagic},
		{"oversized", append(huge, make([]byte, 1<<10)...), ErrTooLarge},
		{"version", v2, ErrVersion},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Rejection happens on the fixed header: nothing past the
			// bad header (plus the read granularity) is consumed.
			limit := len(tc.data)
			if tc.want == ErrTooLarge {
				limit = HeaderSize + 16
			}
			r := NewReader(&failAfter{t: t, r: bytes.NewReader(tc.data), n: limit}, Config{})
			_, err := readAll(r)
			require.ErrorIs(t, err, tc.want)
			assert.Less(t, len(r.buf), 1<<20, "no buffer grown for the announced length")
		})
	}
}

func TestReaderReusesFrame(t *testing.T) {
	stream := streamOf(t, []Frame{
		{Header: Header{Type: TypeEvent, Sequence: 1}, Payload: []byte("one")},
		{Header: Header{Type: TypeEvent, Sequence: 2}, Payload: []byte("two")},
	})
	r := NewReader(bytes.NewReader(stream), Config{})
	f1, err := r.ReadFrame()
	require.NoError(t, err)
	assert.Equal(t, "one", string(f1.Payload))
	f2, err := r.ReadFrame()
	require.NoError(t, err)
	assert.Same(t, f1, f2, "the Reader owns one Frame, overwritten by each call")
	assert.Equal(t, uint64(2), f1.Sequence)
	_, err = r.ReadFrame()
	assert.Equal(t, io.EOF, err)
}

func TestReaderConfig(t *testing.T) {
	r := NewReader(bytes.NewReader(nil), Config{MaxPayload: -5})
	_, err := r.ReadFrame()
	require.ErrorIs(t, err, ErrConfig)

	stream := streamOf(t, []Frame{{Header: Header{Type: TypeRequest}, Payload: make([]byte, 100)}})
	r = NewReader(bytes.NewReader(stream), Config{MaxPayload: 99})
	_, err = r.ReadFrame()
	require.ErrorIs(t, err, ErrTooLarge)
	r = NewReader(bytes.NewReader(stream), Config{RequireChecksum: true})
	_, err = r.ReadFrame()
	require.ErrorIs(t, err, ErrChecksum)
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

func TestReaderErrors(t *testing.T) {
	boom := errors.New("boom")
	_, err := NewReader(errReader{boom}, Config{}).ReadFrame()
	assert.Equal(t, boom, err)
	_, err = NewReader(errReader{nil}, Config{}).ReadFrame()
	assert.Equal(t, io.ErrNoProgress, err)
}

type countingWriter struct {
	bytes.Buffer
	writes int
	short  bool
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.writes++
	if c.short {
		return c.Buffer.Write(p[:len(p)/2])
	}
	return c.Buffer.Write(p)
}

func TestWriter(t *testing.T) {
	var cw countingWriter
	w := NewWriter(&cw, Config{})
	fs := testFrames()
	for i := range fs {
		require.NoError(t, w.WriteFrame(&fs[i]))
	}
	assert.Equal(t, len(fs), cw.writes, "one Write per frame")
	assert.Equal(t, streamOf(t, fs), cw.Bytes())

	// Encoding errors and the peer limit write nothing and are not sticky.
	require.ErrorIs(t, w.WriteFrame(&Frame{}), ErrBadType)
	require.ErrorIs(t, w.WriteFrame(&Frame{Header: Header{Type: TypeEvent}, Payload: make([]byte, DefaultMaxPayload+1)}), ErrTooLarge)
	assert.Equal(t, len(fs), cw.writes)
	require.NoError(t, w.WriteFrame(&fs[0]))

	short := &countingWriter{short: true}
	w = NewWriter(short, Config{})
	require.ErrorIs(t, w.WriteFrame(&fs[0]), io.ErrShortWrite)
	require.ErrorIs(t, w.WriteFrame(&fs[1]), io.ErrShortWrite, "write errors are sticky")
	assert.Equal(t, 1, short.writes)

	require.ErrorIs(t, NewWriter(&cw, Config{MaxPayload: HardMaxPayload + 1}).WriteFrame(&fs[0]), ErrConfig)
}

func TestReaderWriterPipe(t *testing.T) {
	pr, pw := io.Pipe()
	fs := testFrames()
	go func() {
		w := NewWriter(pw, Config{})
		for i := range fs {
			if err := w.WriteFrame(&fs[i]); err != nil {
				pw.CloseWithError(err)
				return
			}
		}
		pw.Close()
	}()
	got, err := readAll(NewReader(pr, Config{}))
	assert.Equal(t, io.EOF, err)
	require.Len(t, got, len(fs))
	for i := range fs {
		assert.Equal(t, normal(fs[i]), got[i])
	}
}

func TestReaderZeroAllocs(t *testing.T) {
	f := Frame{Header: Header{Type: TypeEvent, Flags: FlagChecksum}, Payload: make([]byte, 1000)}
	stream := bytes.Repeat(streamOf(t, []Frame{f}), 200)
	br := bytes.NewReader(stream)
	r := NewReader(br, Config{})
	_, err := r.ReadFrame() // grows the buffer once
	require.NoError(t, err)
	allocs := testing.AllocsPerRun(100, func() {
		_, err = r.ReadFrame()
	})
	require.NoError(t, err)
	assert.Zero(t, allocs)
}
