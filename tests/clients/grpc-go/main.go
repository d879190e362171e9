// A gRPC client of another stack (grpc-go, Debian golang-google-grpc-dev) for lazypull's
// interoperability tests (tests/clients.rs). It dials the socket the way kubelet's and
// crictl's CRI client did before kubernetes/kubernetes#123463: the socket's path is the dial
// target, so grpc-go sends that path as the HTTP/2 :authority.
//
// It sends serialized requests as they are and returns the serialized answers, so the test can
// compare them with what lazypull's own client gets. One call per line on stdin, as JSON:
//
//	{"method": "/runtime.v1.ImageService/ListImages", "request": "<hex>", "stream": false}
//
// One answer per line on stdout:
//
//	{"ok": true, "responses": ["<hex>", ...]}   or   {"ok": false, "code": 5, "message": "..."}
//
// Usage: grpc-go-client [-authority A] SOCKET
package main

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// rawCodec passes serialized messages through untouched.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

type call struct {
	Method  string `json:"method"`
	Request string `json:"request"`
	Stream  bool   `json:"stream"`
}

type answer struct {
	Ok        bool     `json:"ok"`
	Responses []string `json:"responses,omitempty"`
	Code      int      `json:"code"`
	Message   string   `json:"message,omitempty"`
}

func main() {
	authority := flag.String("authority", "", "send this :authority instead of the socket path (grpc.WithAuthority)")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: grpc-go-client [-authority A] SOCKET")
		os.Exit(2)
	}
	socket := flag.Arg(0)
	opts := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}),
	}
	if *authority != "" {
		opts = append(opts, grpc.WithAuthority(*authority))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	conn, err := grpc.DialContext(ctx, socket, opts...)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "dial:", err)
		os.Exit(1)
	}
	defer conn.Close()
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 16<<20)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		if len(in.Bytes()) == 0 {
			continue
		}
		var c call
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			fmt.Fprintln(os.Stderr, "bad input line:", err)
			os.Exit(2)
		}
		req, err := hex.DecodeString(c.Request)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bad request hex:", err)
			os.Exit(2)
		}
		if err := out.Encode(invoke(conn, c, req)); err != nil {
			os.Exit(1)
		}
	}
}

func invoke(conn *grpc.ClientConn, c call, req []byte) answer {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	codec := grpc.ForceCodec(rawCodec{})
	var responses []string
	var err error
	if c.Stream {
		var s grpc.ClientStream
		s, err = conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, c.Method, codec)
		if err == nil {
			err = s.SendMsg(&req)
		}
		if err == nil {
			err = s.CloseSend()
		}
		for err == nil {
			var resp []byte
			if err = s.RecvMsg(&resp); err == nil {
				responses = append(responses, hex.EncodeToString(resp))
			}
		}
		if err == io.EOF {
			err = nil
		}
	} else {
		var resp []byte
		if err = conn.Invoke(ctx, c.Method, &req, &resp, codec); err == nil {
			responses = append(responses, hex.EncodeToString(resp))
		}
	}
	if err != nil {
		st := status.Convert(err)
		return answer{Ok: false, Code: int(st.Code()), Message: st.Message()}
	}
	if responses == nil {
		responses = []string{}
	}
	return answer{Ok: true, Responses: responses}
}
