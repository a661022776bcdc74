package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/big"
	mathrand "math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// ---- A daemon behind a real listener, and clients for it ----

// waitTimeout bounds every wait of a test for something the daemon does.
const waitTimeout = 10 * time.Second

type daemon struct {
	t    testing.TB
	hub  *hub
	url  string // http://127.0.0.1:PORT
	logs *syncBuffer
	stop func() error // shuts the daemon down as SIGTERM would
}

// TestMain lets a test run the real daemon in a child process: this test
// binary, with GOCKETS_TEST_RUN_MAIN=1, is main() with its own flags.
func TestMain(m *testing.M) {
	if os.Getenv("GOCKETS_TEST_RUN_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// engineArgs are added to the flags of startDaemon: TestRedisPassesTheOneNodeTests
// runs tests written for one node again with -redis.
var engineArgs []string

// startDaemon starts a hub with the flags a user would type, behind
// httptest.NewServer.
func startDaemon(t testing.TB, args ...string) *daemon {
	return startDaemonWith(t, nil, args...)
}

// startDaemonWith also lets a test change settings no flag reaches, such as
// a sub-second ping interval.
func startDaemonWith(t testing.TB, tweak func(*config), args ...string) *daemon {
	t.Helper()
	cfg, err := parseConfig(append(args, engineArgs...), func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatalf("parseConfig(%q): %v", args, err)
	}
	if tweak != nil {
		tweak(&cfg)
	}
	logs := &syncBuffer{}
	h, err := newHub(cfg, newLogger(logs, cfg.logLevel))
	if err != nil {
		t.Fatalf("newHub: %v", err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Config = newServer(cfg, h, h.log)
	// Our own listener, which sets what accepted connections inherit.
	srv.Listener.Close()
	plain := cfg
	plain.bind, plain.port, plain.tlsCert = "127.0.0.1", 0, ""
	if srv.Listener, err = listen(plain, srv.Config); err != nil {
		t.Fatalf("listen: %v", err)
	}
	srv.Start()
	h.start()
	var once sync.Once
	var stopErr error
	var stoppedByTest atomic.Bool // then the test judged what stop returned
	stop := func() error {
		once.Do(func() {
			stopErr = shutdown(srv.Config, h)
			srv.Close()
		})
		return stopErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil && !stoppedByTest.Load() {
			t.Errorf("daemon did not stop: %v", err)
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs)
		}
	})
	return &daemon{t: t, hub: h, url: srv.URL, logs: logs, stop: func() error {
		stoppedByTest.Store(true)
		return stop()
	}}
}

// syncBuffer is a log destination that tests can read while the daemon writes.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// call makes an admin request with Host: localhost and returns the status,
// headers and body.
func (d *daemon) call(method, path, body string) (int, http.Header, string) {
	d.t.Helper()
	return d.callHost("localhost", method, path, body)
}

func (d *daemon) callHost(host, method, path, body string) (int, http.Header, string) {
	d.t.Helper()
	return d.request(http.DefaultClient, method, path, body, func(r *http.Request) { r.Host = host })
}

// request makes any request with client; edit sets what call does not.
func (d *daemon) request(client *http.Client, method, path, body string, edit func(*http.Request)) (int, http.Header, string) {
	d.t.Helper()
	req, err := http.NewRequest(method, d.url+path, strings.NewReader(body))
	if err != nil {
		d.t.Fatalf("new request: %v", err)
	}
	req.Host = "localhost"
	edit(req)
	resp, err := client.Do(req)
	if err != nil {
		d.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		d.t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return resp.StatusCode, resp.Header, string(b)
}

// mustCall is call that fails the test unless the status is want; it
// decodes the JSON body into out when out is not nil.
func (d *daemon) mustCall(method, path, body string, want int, out any) string {
	d.t.Helper()
	status, header, got := d.call(method, path, body)
	if status != want {
		d.t.Fatalf("%s %s: status %d, want %d; body %s", method, path, status, want, got)
	}
	if ct := header.Get("Content-Type"); ct != "application/json" {
		d.t.Fatalf("%s %s: Content-Type %q, want application/json", method, path, ct)
	}
	if out != nil {
		if err := json.Unmarshal([]byte(got), out); err != nil {
			d.t.Fatalf("%s %s: decode %s: %v", method, path, got, err)
		}
	}
	return got
}

// in is d for a subtest: failures end the subtest, not its parent.
func (d *daemon) in(t *testing.T) *daemon {
	c := *d
	c.t = t
	return &c
}

// channelOf is the hub's channel of a subscriber token, found as a
// subscribe finds it before it joins.
func (d *daemon) channelOf(subscriberToken string) *channel {
	d.t.Helper()
	c, err := d.hub.engine.find(context.Background(), subscriberToken)
	if err != nil {
		d.t.Fatal(err)
	}
	return c
}

func (d *daemon) prepare(body string) channelJSON {
	d.t.Helper()
	var ch channelJSON
	d.mustCall("POST", "/channel/prepare", body, http.StatusOK, &ch)
	return ch
}

// publishAnswer is the JSON a publish answers (publishReply).
type publishAnswer struct {
	Type        string
	Message     string
	Subscribers int
	Queued      bool
}

func (d *daemon) publish(token, body string) publishAnswer {
	d.t.Helper()
	var r publishAnswer
	d.mustCall("POST", "/channel/publish/"+token, body, http.StatusOK, &r)
	return r
}

func (d *daemon) listeners(publisherToken string) int {
	d.t.Helper()
	var ch channelJSON
	d.mustCall("GET", "/channel/"+publisherToken, "", http.StatusOK, &ch)
	return ch.Listeners
}

func (d *daemon) wsURL(subscriberToken string) string {
	return "ws" + strings.TrimPrefix(d.url, "http") + "/channel/subscribe/" + subscriberToken
}

// subscribe connects x/net/websocket's own client, as a browser would.
func (d *daemon) subscribe(subscriberToken string) *websocket.Conn {
	d.t.Helper()
	cfg, err := websocket.NewConfig(d.wsURL(subscriberToken), "http://localhost")
	if err != nil {
		d.t.Fatalf("websocket config: %v", err)
	}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		d.t.Fatalf("subscribe: %v", err)
	}
	d.t.Cleanup(func() { ws.Close() })
	return ws
}

// receive reads one message within waitTimeout.
func receive(t testing.TB, ws *websocket.Conn) string {
	t.Helper()
	if err := ws.SetReadDeadline(time.Now().Add(waitTimeout)); err != nil {
		t.Fatalf("set deadline: %v", err)
	}
	var msg string
	if err := websocket.Message.Receive(ws, &msg); err != nil {
		t.Fatalf("receive: %v", err)
	}
	return msg
}

// waitFor polls cond until it holds, for what cannot signal by itself (a
// peer that vanished without a word).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// recv waits for a value from c, failing the test after waitTimeout.
func recv[T any](t testing.TB, c <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(waitTimeout):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

// wsClient is a minimal WebSocket client on a raw connection, so that tests
// can see close codes and pings, and send frames a good client never would.
type wsClient struct {
	t         testing.TB
	conn      net.Conn
	br        *bufio.Reader
	closeSent bool
}

// dialWS makes the upgrade by hand. The header lines are sent as given, so
// a test may leave Origin out. It returns the response when it is not 101.
func dialWS(t testing.TB, rawURL string, header http.Header) (*wsClient, *http.Response) {
	t.Helper()
	return dialWSWith(t, &net.Dialer{}, rawURL, header)
}

// dialWSWith dials with dialer; the connection is closed when the test ends.
func dialWSWith(t testing.TB, dialer *net.Dialer, rawURL string, header http.Header) (*wsClient, *http.Response) {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatalf("parse %s: %v", rawURL, err)
	}
	conn, err := dialer.Dial("tcp", u.Host)
	if err != nil {
		t.Fatalf("dial %s: %v", u.Host, err)
	}
	t.Cleanup(func() { conn.Close() })
	return handshake(t, conn, u, header)
}

// handshake upgrades conn; the caller closes it.
func handshake(t testing.TB, conn net.Conn, u *url.URL, header http.Header) (*wsClient, *http.Response) {
	t.Helper()
	key := make([]byte, 16)
	rand.Read(key)
	req := &http.Request{Method: "GET", URL: u, Header: http.Header{
		"Upgrade":               {"websocket"},
		"Connection":            {"Upgrade"},
		"Sec-Websocket-Key":     {base64.StdEncoding.EncodeToString(key)},
		"Sec-Websocket-Version": {"13"},
	}}
	for k, v := range header {
		req.Header[k] = v
	}
	req.Host = u.Host
	if h := header.Get("Host"); h != "" {
		req.Host = h
	}
	if err := req.Write(conn); err != nil {
		t.Fatalf("write handshake: %v", err)
	}
	br := bufio.NewReader(conn)
	if err := conn.SetReadDeadline(time.Now().Add(waitTimeout)); err != nil {
		t.Fatalf("set deadline: %v", err)
	}
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		t.Fatalf("read handshake response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return nil, resp
	}
	return &wsClient{t: t, conn: conn, br: br}, resp
}

func (d *daemon) dial(subscriberToken string) *wsClient {
	d.t.Helper()
	c, resp := dialWS(d.t, d.wsURL(subscriberToken), nil)
	if c == nil {
		d.t.Fatalf("subscribe: status %s", resp.Status)
	}
	return c
}

// send writes one masked frame.
func (c *wsClient) send(fin bool, opcode byte, payload []byte) {
	c.t.Helper()
	c.sendFrame(fin, opcode, payload, true)
}

func (c *wsClient) sendFrame(fin bool, opcode byte, payload []byte, masked bool) {
	c.t.Helper()
	b := []byte{opcode}
	if fin {
		b[0] |= 0x80
	}
	var mask byte
	if masked {
		mask = 0x80
	}
	switch n := len(payload); {
	case n < 126:
		b = append(b, mask|byte(n))
	case n < 1<<16:
		b = append(b, mask|126, byte(n>>8), byte(n))
	default:
		b = binary.BigEndian.AppendUint64(append(b, mask|127), uint64(n))
	}
	key := []byte{0x12, 0x34, 0x56, 0x78}
	if masked {
		b = append(b, key...)
	}
	for i, x := range payload {
		if masked {
			x ^= key[i%4]
		}
		b = append(b, x)
	}
	if _, err := c.conn.Write(b); err != nil {
		c.t.Fatalf("write frame: %v", err)
	}
	c.closeSent = c.closeSent || opcode == websocket.CloseFrame
}

// frame reads the next frame within waitTimeout.
func (c *wsClient) frame() (opcode byte, payload []byte) {
	c.t.Helper()
	if err := c.conn.SetReadDeadline(time.Now().Add(waitTimeout)); err != nil {
		c.t.Fatalf("set deadline: %v", err)
	}
	var hdr [2]byte
	if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
		c.t.Fatalf("read frame: %v", err)
	}
	if hdr[0]&0x80 == 0 || hdr[1]&0x80 != 0 {
		c.t.Fatalf("server sent a fragmented or masked frame: % x", hdr)
	}
	n := uint64(hdr[1] & 0x7f)
	if n >= 126 {
		ext := make([]byte, 2)
		if n == 127 {
			ext = make([]byte, 8)
		}
		if _, err := io.ReadFull(c.br, ext); err != nil {
			c.t.Fatalf("read frame length: %v", err)
		}
		n = 0
		for _, x := range ext {
			n = n<<8 | uint64(x)
		}
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(c.br, payload); err != nil {
		c.t.Fatalf("read payload: %v", err)
	}
	return hdr[0] & 0x0f, payload
}

// next returns the next frame that is not a ping, answering pings like a
// browser does.
func (c *wsClient) next() (opcode byte, payload []byte) {
	c.t.Helper()
	for {
		op, p := c.frame()
		if op != websocket.PingFrame {
			return op, p
		}
		c.send(true, websocket.PongFrame, p)
	}
}

func (c *wsClient) expectText(want string) {
	c.t.Helper()
	op, p := c.next()
	if op != websocket.TextFrame || string(p) != want {
		c.t.Fatalf("got frame %d %q, want text %q", op, p, want)
	}
}

// expectClose reads a close frame with code, answers it unless we began
// the close, and then expects the server to end the TCP connection.
func (c *wsClient) expectClose(code int) string {
	c.t.Helper()
	op, p := c.next()
	if op != websocket.CloseFrame || len(p) < 2 {
		c.t.Fatalf("got frame %d %q, want a close frame", op, p)
	}
	if got := int(binary.BigEndian.Uint16(p)); got != code {
		c.t.Fatalf("close code %d (%q), want %d", got, p[2:], code)
	}
	if !c.closeSent {
		c.send(true, websocket.CloseFrame, p[:2])
	}
	if _, err := c.br.ReadByte(); !errors.Is(err, io.EOF) {
		c.t.Fatalf("after the close frame: %v, want EOF", err)
	}
	return string(p[2:])
}

func closePayload(code int) []byte { return binary.BigEndian.AppendUint16(nil, uint16(code)) }

// hookServer records every request a hook receives.
type hookServer struct {
	url      string
	requests chan hookRequest
}

type hookRequest struct {
	header http.Header
	body   string
}

// startHangingHook serves a hook that answers nothing until unblock is
// called, or the test ends.
func startHangingHook(t testing.TB) (hook *hookServer, unblock func()) {
	t.Helper()
	release := make(chan struct{})
	hook = startHook(t, func(r *http.Request) int {
		<-release
		return http.StatusOK
	})
	var once sync.Once
	unblock = func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock)
	return hook, unblock
}

// startHook serves a hook that answers with answer(r) (200 when nil).
func startHook(t testing.TB, answer func(*http.Request) int) *hookServer {
	t.Helper()
	hs := &hookServer{requests: make(chan hookRequest, 10000)}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("hook: read body: %v", err)
		}
		status := http.StatusOK
		if answer != nil {
			status = answer(r)
		}
		if status == http.StatusOK {
			hs.requests <- hookRequest{r.Header.Clone(), string(body)}
		}
		w.WriteHeader(status)
	}))
	t.Cleanup(srv.Close)
	hs.url = srv.URL
	return hs
}

// channelBody is the exact JSON of a channel object.
func channelBody(ch channelJSON) string {
	b, _ := json.Marshal(ch)
	return string(b) + "\n"
}

func ptr(s string) *string { return &s }

// ---- Routes and JSON ----

func TestRoutesAnswerTheContract(t *testing.T) {
	d := startDaemon(t)

	if got := d.mustCall("GET", "/channel", "", 200, nil); got != `{"channels":[]}`+"\n" {
		t.Errorf("GET /channel with no channels = %s", got)
	}
	if got := d.mustCall("GET", "/channel/show", "", 200, nil); got != `{"channels":[]}`+"\n" {
		t.Errorf("GET /channel/show with no channels = %s", got)
	}

	plain := d.prepare("")
	if got, want := d.mustCall("GET", "/channel/"+plain.PublisherToken, "", 200, nil),
		fmt.Sprintf(`{"publisher_token":%q,"subscriber_token":%q,"subscriber_message_hook_url":null,"tag":null,"listeners":0}`+"\n",
			plain.PublisherToken, plain.SubscriberToken); got != want {
		t.Errorf("GET /channel/{token}:\n got %s\nwant %s", got, want)
	}

	hooked := d.prepare(`{"subscriber_message_hook_url": "http://localhost/log.php", "tag": "room-1"}`)
	want := channelJSON{hooked.PublisherToken, hooked.SubscriberToken, ptr("http://localhost/log.php"), ptr("room-1"), 0}
	if got := d.mustCall("GET", "/channel/show/"+hooked.PublisherToken, "", 200, nil); got != channelBody(want) {
		t.Errorf("GET /channel/show/{token} = %s, want %s", got, channelBody(want))
	}

	list := `{"channels":[` + strings.TrimSuffix(channelBody(plain), "\n") + "," + strings.TrimSuffix(channelBody(want), "\n") + "]}\n"
	if got := d.mustCall("GET", "/channel", "", 200, nil); got != list {
		t.Errorf("GET /channel:\n got %s\nwant %s", got, list)
	}
	if got := d.mustCall("GET", "/channel/show", "", 200, nil); got != list {
		t.Errorf("GET /channel/show:\n got %s\nwant %s", got, list)
	}

	edited := d.mustCall("PATCH", "/channel/edit/"+plain.PublisherToken, `{"subscriber_message_hook_url": "domain.com", "tag": "lobby"}`, 200, nil)
	plain.HookURL, plain.Tag = ptr("domain.com"), ptr("lobby")
	if edited != channelBody(plain) {
		t.Errorf("PATCH /channel/edit = %s, want %s", edited, channelBody(plain))
	}

	if got := d.mustCall("POST", "/channel/publish/"+plain.PublisherToken, "hello", 200, nil); got != `{"type":"INF","message":"no subscriber is connected: message kept for the next one","subscribers":0,"queued":true}`+"\n" {
		t.Errorf("publish = %s", got)
	}
	if got := d.mustCall("DELETE", "/channel/publish/"+plain.PublisherToken, "", 200, nil); got != `{"type":"OK","message":"channel closed and deleted"}`+"\n" {
		t.Errorf("delete = %s", got)
	}
	for _, path := range []string{"/channel/" + plain.PublisherToken, "/channel/show/" + plain.PublisherToken} {
		if got := d.mustCall("GET", path, "", 404, nil); got != `{"type":"ERR","message":"publisher token not found"}`+"\n" {
			t.Errorf("GET %s after delete = %s", path, got)
		}
	}
}

func TestEditKeepsWhatItIsNotGiven(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare(`{"subscriber_message_hook_url": "https://app.example/hook", "tag": "a"}`)
	path := "/channel/edit/" + ch.PublisherToken

	tests := []struct {
		name, body string
		hook, tag  *string
	}{
		{"empty object keeps both", `{}`, ptr("https://app.example/hook"), ptr("a")},
		{"tag only", `{"tag": "b"}`, ptr("https://app.example/hook"), ptr("b")},
		{"hook only", `{"subscriber_message_hook_url": "app.example:8080/h"}`, ptr("app.example:8080/h"), ptr("b")},
		{"null clears the hook", `{"subscriber_message_hook_url": null}`, nil, ptr("b")},
		{"empty string clears the tag", `{"tag": ""}`, nil, nil},
		{"the 0.2 client sends both", `{"subscriber_message_hook_url": "http://h/x", "tag": "c"}`, ptr("http://h/x"), ptr("c")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := d.in(t)
			var got channelJSON
			d.mustCall("PATCH", path, tc.body, 200, &got)
			want := channelJSON{ch.PublisherToken, ch.SubscriberToken, tc.hook, tc.tag, 0}
			if channelBody(got) != channelBody(want) {
				t.Errorf("after %s: %s, want %s", tc.body, channelBody(got), channelBody(want))
			}
		})
	}
}

func TestSearchFiltersByTag(t *testing.T) {
	d := startDaemon(t)
	d.prepare(`{"tag": "user-1"}`)
	d.prepare(`{"tag": "user-22"}`)
	d.prepare(`{"tag": "admin"}`)
	d.prepare(``)

	tests := []struct {
		search string
		want   []string
	}{
		{"", []string{"user-1", "user-22", "admin", ""}},
		{"^user-", []string{"user-1", "user-22"}},
		{`^user-\d$`, []string{"user-1"}},
		{"min", []string{"admin"}},
		{"nothing", []string{}},
	}
	for _, tc := range tests {
		t.Run(tc.search, func(t *testing.T) {
			d := d.in(t)
			var got struct{ Channels []channelJSON }
			d.mustCall("GET", "/channel/show?search="+url.QueryEscape(tc.search), "", 200, &got)
			tags := []string{}
			for _, ch := range got.Channels {
				tag := ""
				if ch.Tag != nil {
					tag = *ch.Tag
				}
				tags = append(tags, tag)
			}
			if fmt.Sprint(tags) != fmt.Sprint(tc.want) {
				t.Errorf("search %q: tags %q, want %q", tc.search, tags, tc.want)
			}
		})
	}

	for _, bad := range []string{"(", "[a-", `\`, "a{2,1}"} {
		got := d.mustCall("GET", "/channel/show?search="+url.QueryEscape(bad), "", 400, nil)
		if !strings.HasPrefix(got, `{"type":"ERR","message":"search is not a valid regular expression`) {
			t.Errorf("search %q: %s", bad, got)
		}
	}
}

func TestUnknownRoutesAndMethodsAnswerJSON(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	tests := []struct {
		method, path string
		status       int
		allow        string
		message      string // part of it, when it matters
	}{
		{"GET", "/nowhere", 404, "", ""},
		{"GET", "/channel/a/b/c", 404, "", ""},
		// Paths are exact: net/http's mux would redirect to the cleaned
		// path with an HTML body, which clients of an API do not follow.
		{"GET", "//channel", 404, "", "no such route: GET //channel (paths are exact: did you mean /channel?)"},
		{"POST", "/channel/./publish/" + ch.PublisherToken, 404, "", "(paths are exact: did you mean /channel/publish/" + ch.PublisherToken + "?)"},
		{"GET", "/channel/../channel?search=x", 404, "", "did you mean /channel?search=x?"},
		{"POST", "/channel", 405, "GET, HEAD", ""},
		{"DELETE", "/channel/prepare", 405, "POST", ""},
		{"GET", "/channel/prepare", 405, "POST", ""},
		{"PUT", "/channel/publish/" + ch.PublisherToken, 405, "DELETE, POST", ""},
		{"GET", "/channel/publish/" + ch.PublisherToken, 405, "DELETE, POST", ""},
		{"POST", "/channel/edit/" + ch.PublisherToken, 405, "PATCH", ""},
		{"POST", "/channel/subscribe/" + ch.SubscriberToken, 405, "GET, HEAD", ""},
	}
	for _, tc := range tests {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			d := d.in(t)
			noRedirects := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
			status, header, body := d.request(noRedirects, tc.method, tc.path, "", func(*http.Request) {})
			if status != tc.status {
				t.Errorf("status %d, want %d", status, tc.status)
			}
			if got := header.Get("Allow"); got != tc.allow {
				t.Errorf("Allow %q, want %q", got, tc.allow)
			}
			if ct := header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type %q", ct)
			}
			var r struct{ Type, Message string }
			if err := json.Unmarshal([]byte(body), &r); err != nil || r.Type != "ERR" || r.Message == "" {
				t.Errorf("body %s is not a JSON error (%v)", body, err)
			}
			if !strings.Contains(r.Message, tc.message) {
				t.Errorf("message %q, want it to contain %q", r.Message, tc.message)
			}
		})
	}
}

// ---- Broadcast ----

func TestBroadcastReachesEverySubscriberInOrderOnce(t *testing.T) {
	const subscribers, messages = 50, 200
	d := startDaemon(t)
	ch := d.prepare("")
	other := d.prepare("")

	clients := make([]*websocket.Conn, subscribers)
	for i := range clients {
		clients[i] = d.subscribe(ch.SubscriberToken)
	}
	bystander := d.subscribe(other.SubscriberToken)
	if n := d.listeners(ch.PublisherToken); n != subscribers {
		t.Fatalf("listeners = %d after %d subscribed, want %d", n, subscribers, subscribers)
	}

	for i := range messages {
		if r := d.publish(ch.PublisherToken, fmt.Sprintf("message %d", i)); r.Subscribers != subscribers {
			t.Fatalf("publish %d handed to %d subscribers, want %d", i, r.Subscribers, subscribers)
		}
	}

	var wg sync.WaitGroup
	for c, ws := range clients {
		wg.Go(func() {
			for i := range messages {
				if got, want := receive(t, ws), fmt.Sprintf("message %d", i); got != want {
					t.Errorf("subscriber %d: got %q, want %q", c, got, want)
					return
				}
			}
		})
	}
	wg.Wait()

	// One more message each proves that nothing was sent twice.
	d.publish(ch.PublisherToken, "last")
	for c, ws := range clients {
		if got := receive(t, ws); got != "last" {
			t.Fatalf("subscriber %d: got %q after the %d messages, want \"last\"", c, got, messages)
		}
	}
	// The subscriber of another channel saw none of them.
	d.publish(other.PublisherToken, "for the other channel")
	if got := receive(t, bystander); got != "for the other channel" {
		t.Errorf("subscriber of another channel got %q", got)
	}
}

func TestPublishSendsTheRawBody(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	ws := d.subscribe(ch.SubscriberToken)
	for _, body := range []string{`{"data":"content"}`, "line 1\nline 2", "ünïcødé ✓", strings.Repeat("x", 70000), ""} {
		d.publish(ch.PublisherToken, body)
		if got := receive(t, ws); got != body {
			t.Errorf("published %d bytes, received %d", len(body), len(got))
		}
	}
}

// ---- Hooks ----

func TestFramesReachTheHookRawAndInOrder(t *testing.T) {
	hook := startHook(t, nil)
	d := startDaemon(t)
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url+"/log.php"))
	ws := d.subscribe(ch.SubscriberToken)

	const frames = 100
	for i := range frames {
		if err := websocket.Message.Send(ws, fmt.Sprintf(`{"n":%d}`, i)); err != nil {
			t.Fatalf("send: %v", err)
		}
	}
	if err := websocket.Message.Send(ws, []byte{0, 1, 2, 255}); err != nil {
		t.Fatalf("send binary: %v", err)
	}
	for i := range frames {
		r := recv(t, hook.requests, "hook request")
		if want := fmt.Sprintf(`{"n":%d}`, i); r.body != want {
			t.Fatalf("hook request %d: body %q, want %q", i, r.body, want)
		}
		if ct := r.header.Get("Content-Type"); ct != "text/plain; charset=utf-8" {
			t.Errorf("Content-Type %q", ct)
		}
	}
	if r := recv(t, hook.requests, "binary hook request"); r.body != "\x00\x01\x02\xff" || r.header.Get("Content-Type") != "application/octet-stream" {
		t.Errorf("binary frame reached the hook as %q, %q", r.body, r.header.Get("Content-Type"))
	}
}

func TestHookWithoutSchemeIsDeliveredOverHTTP(t *testing.T) {
	hook := startHook(t, nil)
	d := startDaemon(t)
	hostPort := strings.TrimPrefix(hook.url, "http://") + "/in"
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hostPort))
	if *ch.HookURL != hostPort {
		t.Fatalf("hook URL echoed as %q, want %q", *ch.HookURL, hostPort)
	}
	ws := d.subscribe(ch.SubscriberToken)
	if err := websocket.Message.Send(ws, "hi"); err != nil {
		t.Fatal(err)
	}
	if r := recv(t, hook.requests, "hook request"); r.body != "hi" {
		t.Errorf("hook got %q", r.body)
	}
}

func TestHangingOrDownHookBlocksNothing(t *testing.T) {
	d := startDaemonWith(t, func(c *config) {
		c.hook = hookPolicy{timeout: time.Second, attempts: 2, backoffMin: 10 * time.Millisecond, backoffMax: 10 * time.Millisecond}
	})
	release := make(chan struct{})
	hanging := startHook(t, func(r *http.Request) int {
		select {
		case <-release:
		case <-r.Context().Done():
		}
		return http.StatusOK
	})
	t.Cleanup(func() { close(release) })
	working := startHook(t, nil)
	down := httptest.NewServer(http.NotFoundHandler())
	downURL := down.URL
	down.Close()

	slow := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hanging.url))
	gone := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, downURL))
	fine := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, working.url))
	slowWS, goneWS, fineWS := d.subscribe(slow.SubscriberToken), d.subscribe(gone.SubscriberToken), d.subscribe(fine.SubscriberToken)

	for i := range 5 {
		for _, ws := range []*websocket.Conn{slowWS, goneWS} {
			if err := websocket.Message.Send(ws, fmt.Sprint("stuck ", i)); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Subscribers whose hook hangs or is down still receive, at once.
	for _, c := range []struct {
		ch channelJSON
		ws *websocket.Conn
	}{{slow, slowWS}, {gone, goneWS}} {
		d.publish(c.ch.PublisherToken, "still here")
		if got := receive(t, c.ws); got != "still here" {
			t.Errorf("got %q", got)
		}
	}
	// Another channel's hook is not held up.
	if err := websocket.Message.Send(fineWS, "on time"); err != nil {
		t.Fatal(err)
	}
	if r := recv(t, working.requests, "working hook"); r.body != "on time" {
		t.Errorf("working hook got %q", r.body)
	}
}

func TestFramesWithoutHookAreDroppedAndLogged(t *testing.T) {
	d := startDaemon(t, "-log-level", "3")
	ch := d.prepare("")
	c := d.dial(ch.SubscriberToken)
	c.send(true, websocket.TextFrame, []byte("nobody listens"))
	// The reader handles frames in order: once our close is answered, the
	// frame before it has been dropped.
	c.send(true, websocket.CloseFrame, closePayload(closeNormal))
	c.expectClose(closeNormal)
	if !strings.Contains(d.logs.String(), `level=DEBUG msg="message dropped: channel has no hook"`) {
		t.Errorf("no debug line for the dropped frame in:\n%s", d.logs)
	}
}

// ---- Keepalive and listeners ----

func TestPingKeepsAnsweringSubscribersAndClosesSilentOnes(t *testing.T) {
	const interval = 100 * time.Millisecond
	d := startDaemonWith(t, func(c *config) { c.pingInterval = interval })
	ch := d.prepare("")
	c := d.dial(ch.SubscriberToken)

	var lastPong time.Time
	for i := range 5 {
		op, p := c.frame()
		if op != websocket.PingFrame {
			t.Fatalf("frame %d: opcode %d, want a ping", i, op)
		}
		c.send(true, websocket.PongFrame, p)
		lastPong = time.Now()
		if n := d.listeners(ch.PublisherToken); n != 1 {
			t.Fatalf("listeners = %d while answering pings, want 1", n)
		}
	}
	// Now stay silent: pings keep coming, then the close.
	for {
		op, p := c.frame()
		if op == websocket.PingFrame {
			continue
		}
		if op != websocket.CloseFrame || binary.BigEndian.Uint16(p) != closeGoingAway {
			t.Fatalf("got frame %d %q, want close 1001", op, p)
		}
		break
	}
	if elapsed := time.Since(lastPong); elapsed < interval || elapsed > 10*interval {
		t.Errorf("closed %v after the last pong; want between one and a few intervals of %v", elapsed, interval)
	}
	if n := d.listeners(ch.PublisherToken); n != 0 {
		t.Errorf("listeners = %d after the ping timeout, want 0", n)
	}
}

// TestSilentSubscriberIsClosedTwoIntervalsAfterItsLastFrame measures the
// README's figures, which TestPingKeepsAnsweringSubscribersAndClosesSilentOnes
// bounds loosely: a ping every interval, and a subscriber that has sent
// nothing, no pong and no frame, for two intervals closed with 1001 then,
// not sooner (a pong may take an interval) and not much later (proxies
// are told to wait two intervals and a little more).
func TestSilentSubscriberIsClosedTwoIntervalsAfterItsLastFrame(t *testing.T) {
	const interval = 500 * time.Millisecond
	d := startDaemonWith(t, func(c *config) { c.pingInterval = interval })
	ch := d.prepare("")
	c := d.dial(ch.SubscriberToken)
	var pings []time.Time
	for len(pings) < 3 {
		op, p := c.frame()
		if op != websocket.PingFrame {
			t.Fatalf("frame %d %q, want a ping", op, p)
		}
		pings = append(pings, time.Now())
		c.send(true, websocket.PongFrame, p)
	}
	// The last frame is a message, not a pong: any frame shows it is alive.
	if op, p := c.frame(); op != websocket.PingFrame {
		t.Fatalf("frame %d %q, want a ping", op, p)
	}
	pings = append(pings, time.Now())
	last := time.Now() // the daemon reads the frame after this
	c.send(true, websocket.TextFrame, []byte("still here"))
	for i := 1; i < len(pings); i++ {
		if gap := pings[i].Sub(pings[i-1]); gap < interval*8/10 || gap > interval*5/4 {
			t.Errorf("ping %d came %v after the one before, want about %v", i+1, gap, interval)
		}
	}
	// Silent now: pings may still come, then the close.
	for {
		op, p := c.frame()
		if op == websocket.PingFrame {
			continue
		}
		if op != websocket.CloseFrame || len(p) < 2 || binary.BigEndian.Uint16(p) != closeGoingAway {
			t.Fatalf("got frame %d %q, want close 1001", op, p)
		}
		break
	}
	if elapsed := time.Since(last); elapsed < 2*interval || elapsed > 2*interval+interval/2 {
		t.Errorf("closed %v after the last frame, want two intervals (%v) and at most half an interval more", elapsed, 2*interval)
	}
	if n := d.listeners(ch.PublisherToken); n != 0 {
		t.Errorf("listeners = %d once closed, want 0", n)
	}
}

func TestListenersIsExact(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	want := func(n int, after string) {
		t.Helper()
		if got := d.listeners(ch.PublisherToken); got != n {
			t.Fatalf("listeners = %d after %s, want %d", got, after, n)
		}
	}
	want(0, "prepare")
	a, b, c := d.dial(ch.SubscriberToken), d.dial(ch.SubscriberToken), d.dial(ch.SubscriberToken)
	ws := d.subscribe(ch.SubscriberToken)
	want(4, "four connected")

	a.send(true, websocket.CloseFrame, closePayload(closeNormal))
	a.expectClose(closeNormal)
	want(3, "a client close")

	ws.Close() // x/net's client close
	waitFor(t, "listeners to drop to 2", func() bool { return d.listeners(ch.PublisherToken) == 2 })

	b.conn.Close() // vanishes without a close frame
	waitFor(t, "listeners to drop to 1", func() bool { return d.listeners(ch.PublisherToken) == 1 })

	c.send(true, websocket.TextFrame, []byte("frame without a mask"))
	c.sendFrame(true, websocket.TextFrame, []byte("unmasked"), false)
	c.expectClose(closeProtocolError)
	want(0, "a protocol error")
}

// ---- Delete ----

func TestDeleteClosesSubscribersAndForgetsTheChannel(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	clients := []*wsClient{d.dial(ch.SubscriberToken), d.dial(ch.SubscriberToken), d.dial(ch.SubscriberToken)}
	d.publish(ch.PublisherToken, "before delete 1")
	d.publish(ch.PublisherToken, "before delete 2")

	d.mustCall("DELETE", "/channel/publish/"+ch.PublisherToken, "", 200, nil)
	for _, c := range clients {
		c.expectText("before delete 1")
		c.expectText("before delete 2")
		if reason := c.expectClose(closeNormal); reason != "channel deleted" {
			t.Errorf("close reason %q", reason)
		}
	}

	notFound := `{"type":"ERR","message":"publisher token not found"}` + "\n"
	for _, r := range []struct{ method, path string }{
		{"GET", "/channel/" + ch.PublisherToken},
		{"GET", "/channel/show/" + ch.PublisherToken},
		{"POST", "/channel/publish/" + ch.PublisherToken},
		{"DELETE", "/channel/publish/" + ch.PublisherToken},
		{"PATCH", "/channel/edit/" + ch.PublisherToken},
	} {
		if got := d.mustCall(r.method, r.path, "{}", 404, nil); got != notFound {
			t.Errorf("%s %s after delete: %s", r.method, r.path, got)
		}
	}
	_, resp := dialWS(t, d.wsURL(ch.SubscriberToken), nil)
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 404 || string(body) != `{"type":"ERR","message":"subscriber token not found"}`+"\n" {
		t.Errorf("subscribe after delete: %s %s", resp.Status, body)
	}
	if got := d.mustCall("GET", "/channel", "", 200, nil); got != `{"channels":[]}`+"\n" {
		t.Errorf("channels after delete: %s", got)
	}
}

// ---- Admin lock, Origin ----

func TestAdminRoutesAnswerOnlyTheirHost(t *testing.T) {
	d := startDaemon(t, "-host-name", "gockets.internal")
	var ch channelJSON
	status, _, body := d.callHost("gockets.internal:8844", "POST", "/channel/prepare", "")
	if status != 200 || json.Unmarshal([]byte(body), &ch) != nil {
		t.Fatalf("prepare with the right host: %d %s", status, body)
	}
	routes := []struct{ method, path string }{
		{"POST", "/channel/prepare"},
		{"GET", "/channel"},
		{"GET", "/channel/" + ch.PublisherToken},
		{"POST", "/channel/publish/" + ch.PublisherToken},
		{"GET", "/channel/show"},
		{"GET", "/channel/show/" + ch.PublisherToken},
		{"PATCH", "/channel/edit/" + ch.PublisherToken},
		{"DELETE", "/channel/publish/" + ch.PublisherToken}, // last: it deletes
	}
	hosts := []struct {
		host string
		ok   bool
	}{
		{"localhost", false},
		{"127.0.0.1", false},
		{"evil.example", false},
		{"gockets.internal.evil.example", false},
		{"GOCKETS.Internal", true},
		{"gockets.internal:1", true},
	}
	for _, r := range routes {
		for _, h := range hosts {
			status, header, body := d.callHost(h.host, r.method, r.path, "{}")
			forbidden := status == http.StatusForbidden
			if forbidden == h.ok || header.Get("Content-Type") != "application/json" {
				t.Errorf("%s %s with Host %q: %d %s", r.method, r.path, h.host, status, body)
			}
			if forbidden && body != `{"type":"ERR","message":"admin routes answer only to host gockets.internal"}`+"\n" {
				t.Errorf("403 body %s", body)
			}
		}
	}
}

func TestSubscribeIsOpenToAnyHostAndNoOrigin(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	for _, header := range []http.Header{
		{"Host": {"evil.example"}, "Origin": {"https://evil.example"}},
		{}, // PHP, node, curl: no Origin at all
	} {
		c, resp := dialWS(t, d.wsURL(ch.SubscriberToken), header)
		if c == nil {
			t.Fatalf("subscribe with %v: %s", header, resp.Status)
		}
		d.publish(ch.PublisherToken, "hello")
		c.expectText("hello")
		c.send(true, websocket.CloseFrame, closePayload(closeNormal))
		c.expectClose(closeNormal)
	}
}

func TestSubscribeToUnknownTokenIs404(t *testing.T) {
	d := startDaemon(t)
	status, _, body := d.call("GET", "/channel/subscribe/nope", "")
	if status != 404 || body != `{"type":"ERR","message":"subscriber token not found"}`+"\n" {
		t.Errorf("unknown subscriber token: %d %s", status, body)
	}
}

// ---- Tokens ----

func TestTokensAreRandomAndDistinct(t *testing.T) {
	const channels = 10000
	d := startDaemon(t)
	format := regexp.MustCompile(`^[A-Z2-7]{26}$`) // base32: 130 bits, URL-safe
	seen := make(map[string]bool, 2*channels)
	for range channels {
		ch := d.prepare("")
		for _, tok := range []string{ch.PublisherToken, ch.SubscriberToken} {
			if !format.MatchString(tok) {
				t.Fatalf("token %q is not 26 base32 characters", tok)
			}
			if seen[tok] {
				t.Fatalf("token %q given twice", tok)
			}
			seen[tok] = true
		}
	}
	var list struct{ Channels []channelJSON }
	d.mustCall("GET", "/channel", "", 200, &list)
	if len(list.Channels) != channels {
		t.Errorf("%d channels listed, want %d", len(list.Channels), channels)
	}
}

// ---- Flags, logs and the whole daemon ----

// newTestHub is a hub configured by args alone (no environment), not
// started: for tests of its parts without a listener.
func newTestHub(t testing.TB, args ...string) *hub {
	t.Helper()
	cfg, err := parseConfig(args, func(string) string { return "" }, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	h, err := newHub(cfg, newLogger(io.Discard, 2))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// TestDefaultsAreTheREADMEs: with no flag and no environment, every
// default is the one the README's table of flags states, and the server's
// limits are the ones net/http is handed.
func TestDefaultsAreTheREADMEs(t *testing.T) {
	h := newTestHub(t)
	cfg := h.cfg
	srv := newServer(cfg, h, h.log)
	for _, tc := range []struct {
		flag      string
		got, want any
	}{
		{"-port", cfg.port, 8844},
		{"-bind", cfg.bind, ""},
		{"-host-name", cfg.hostName, "localhost"},
		{"-log-level", cfg.logLevel, 1},
		{"-ping-interval", cfg.pingInterval, time.Minute},
		{"-max-message-bytes", cfg.maxMessageBytes, int64(1 << 20)},
		{"-max-request-bytes", cfg.maxRequestBytes, int64(65536)},
		{"-max-header-bytes", srv.MaxHeaderBytes, 32768},
		{"-read-header-timeout", srv.ReadHeaderTimeout, 10 * time.Second},
		{"-read-timeout", srv.ReadTimeout, 30 * time.Second},
		{"-write-timeout", srv.WriteTimeout, 30 * time.Second},
		{"-idle-timeout", srv.IdleTimeout, 2 * time.Minute},
		{"-hook-timeout", cfg.hook.timeout, 5 * time.Second},
		{"-hook-events", cfg.hookEvents, false},
		{"-backlog", cfg.backlog, 100},
		{"-backlog-ttl", cfg.backlogTTL, time.Minute},
		{"-channel-ttl", cfg.channelTTL, time.Duration(0)},
		{"-redis-prefix", cfg.redisPrefix, "gockets:"},
		{"-state-file", cfg.stateFile, ""},
	} {
		if tc.got != tc.want {
			t.Errorf("%s defaults to %v, the README says %v", tc.flag, tc.got, tc.want)
		}
	}
	if cfg.redis != nil || cfg.adminToken != "" || len(cfg.adminAllow) != 0 || len(cfg.allowedOrigins) != 0 || cfg.tlsCert != "" {
		t.Errorf("a default that should be none: redis %v, admin token set %v, admin-allow %v, allowed origins %v, tls %q",
			cfg.redis, cfg.adminToken != "", cfg.adminAllow, cfg.allowedOrigins, cfg.tlsCert)
	}
}

func TestFlagsOutOfRangeAreRefused(t *testing.T) {
	tests := []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"-port", "70000"}, nil, "-port 70000 is out of range"},
		{[]string{"-port", "-1"}, nil, "-port -1 is out of range"},
		{[]string{"-port", "http"}, nil, `invalid value "http" for flag -port`},
		{[]string{"-log-level", "0"}, nil, "-log-level 0 is out of range"},
		{[]string{"-log-level", "4"}, nil, "-log-level 4 is out of range"},
		{[]string{"-ping-interval", "0"}, nil, "-ping-interval 0 is out of range"},
		{[]string{"-ping-interval", "86401"}, nil, "-ping-interval 86401 is out of range"},
		{[]string{"-ping-interval", "1.5"}, nil, `invalid value "1.5" for flag -ping-interval`},
		{[]string{"-backlog", "1001"}, nil, "-backlog 1001 is out of range"},
		{[]string{"-backlog", "-1"}, nil, "-backlog -1 is out of range"},
		{[]string{"-max-message-bytes", "0"}, nil, "-max-message-bytes 0 is out of range"},
		{[]string{"-read-header-timeout", "0s"}, nil, "-read-header-timeout 0s is out of range"},
		{[]string{"-host-name", " "}, nil, "-host-name must not be empty"},
		{[]string{"-no-such-flag"}, nil, "flag provided but not defined: -no-such-flag"},
		{[]string{"extra"}, nil, `unexpected argument "extra"`},
		// A client's token is read trimmed: one with white space around it
		// could never be presented.
		{[]string{"-bind", "127.0.0.1", "-port", "0", "-admin-token", "abc "}, nil, "-admin-token must not begin or end with white space"},
		{[]string{"-bind", "127.0.0.1", "-port", "0"}, map[string]string{"GOCKETS_ADMIN_TOKEN": "abc\n"}, "GOCKETS_ADMIN_TOKEN must not begin or end with white space"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			// Cancelled: a daemon wrongly started stops at once.
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			err := run(ctx, tc.args, func(name string) string { return tc.env[name] }, &stdout, &stderr)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("run(%q) = %v, want an error containing %q", tc.args, err, tc.want)
			}
			if code := exitStatus(err); code != 2 {
				t.Errorf("exit status %d, want 2", code)
			}
		})
	}
}

func TestHelpPrintsEveryFlag(t *testing.T) {
	var stdout bytes.Buffer
	if err := run(context.Background(), []string{"-h"}, func(string) string { return "" }, &stdout, io.Discard); err != nil {
		t.Fatalf("run -h: %v", err)
	}
	for _, name := range []string{"-port", "-bind", "-host-name", "-log-level", "-ping-interval", "-admin-token",
		"-admin-allow", "-trust-proxy", "-allowed-origins", "-tls-cert", "-tls-key", "-max-message-bytes",
		"-max-request-bytes", "-max-header-bytes", "-read-header-timeout", "-read-timeout", "-write-timeout",
		"-idle-timeout", "-hook-timeout", "-hook-secret", "-hook-events", "-state-file", "-backlog",
		"-backlog-ttl", "-channel-ttl", "-version"} {
		if !regexp.MustCompile(`(?m)^  ` + name + `( |$)`).MatchString(stdout.String()) {
			t.Errorf("-h does not describe %s:\n%s", name, stdout.String())
		}
	}
}

func TestLogLevels(t *testing.T) {
	tests := []struct {
		level               string
		info, debug, errors bool
	}{
		{"1", true, false, true},
		{"2", false, false, true},
		{"3", true, true, true},
	}
	for _, tc := range tests {
		t.Run("-log-level "+tc.level, func(t *testing.T) {
			d := startDaemon(t, "-log-level", tc.level)
			ch := d.prepare("")
			c := d.dial(ch.SubscriberToken)
			c.sendFrame(true, websocket.TextFrame, []byte("unmasked"), false)
			c.expectClose(closeProtocolError)
			d.hub.log.Error("an error line")
			logs := d.logs.String()
			for _, l := range []struct {
				line string
				want bool
			}{
				{`level=INFO msg="channel prepared"`, tc.info},
				{`level=DEBUG msg="subscriber connected"`, tc.debug},
				{`level=ERROR msg="an error line"`, tc.errors},
			} {
				if strings.Contains(logs, l.line) != l.want {
					t.Errorf("log has %q: %v, want %v; log:\n%s", l.line, !l.want, l.want, logs)
				}
			}
			if strings.Contains(logs, ch.SubscriberToken) || strings.Contains(logs, ch.PublisherToken) {
				t.Errorf("a token reached the log:\n%s", logs)
			}
		})
	}
}

// runDaemon starts run() with args, -bind 127.0.0.1 and -port 0, and returns its address,
// its log, and a function that stops it and returns what run returned.
func runDaemon(t *testing.T, args ...string) (addr string, logs *addrWatcher, stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	logs = &addrWatcher{addr: make(chan string, 1)}
	result := make(chan error, 1)
	go func() {
		result <- run(ctx, append([]string{"-bind", "127.0.0.1", "-port", "0"}, args...), func(string) string { return "" }, io.Discard, logs)
	}()
	select {
	case addr = <-logs.addr:
	case err := <-result:
		t.Fatalf("run ended at start: %v", err)
	case <-time.After(waitTimeout):
		t.Fatal("run did not log its address")
	}
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			err = recv(t, result, "run to return")
		})
		return err
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("run: %v", err)
		}
	})
	_, port, _ := net.SplitHostPort(addr)
	return "127.0.0.1:" + port, logs, stop
}

// addrWatcher is run's log output: it finds the listening address.
type addrWatcher struct {
	syncBuffer
	addr chan string
	once sync.Once
}

var listeningAddr = regexp.MustCompile(`msg="gockets listening" addr=(\S+)`)

func (w *addrWatcher) Write(p []byte) (int, error) {
	if m := listeningAddr.FindSubmatch(p); m != nil {
		w.once.Do(func() { w.addr <- string(m[1]) })
	}
	return w.syncBuffer.Write(p)
}

func TestShutdownClosesSubscribersAndFinishesRequests(t *testing.T) {
	addr, _, stop := runDaemon(t)
	d := &daemon{t: t, url: "http://" + addr}
	ch := d.prepare("")
	c := d.dial(ch.SubscriberToken)

	// A publish whose body is still on its way when shutdown begins. The
	// server says "100 Continue" once the handler reads the body.
	pub, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	const body = "in flight"
	fmt.Fprintf(pub, "POST /channel/publish/%s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n", ch.PublisherToken, len(body))
	br := bufio.NewReader(pub)
	if line, err := br.ReadString('\n'); err != nil || line != "HTTP/1.1 100 Continue\r\n" {
		t.Fatalf("interim answer %q, %v", line, err)
	}
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}

	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	if reason := c.expectClose(closeGoingAway); reason != "server shutting down" {
		t.Errorf("close reason %q", reason)
	}
	if _, err := io.WriteString(pub, body); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Errorf("in-flight publish answered %v, %v", resp, err)
	}
	if err := recv(t, stopped, "run to return"); err != nil {
		t.Errorf("run returned %v, want nil (exit 0)", err)
	}
	if conn, err := net.Dial("tcp", addr); err == nil {
		conn.Close()
		t.Error("still accepting connections after shutdown")
	}
}

// ---- Bad input ----

func TestBadInputIsRefusedAndChangesNothing(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare(`{"subscriber_message_hook_url": "http://app/hook", "tag": "t"}`)
	before := d.mustCall("GET", "/channel", "", 200, nil)

	tests := []struct {
		name, body, message string
	}{
		{"malformed JSON", `{"tag": "x"`, "body is not a valid JSON object: unexpected EOF"},
		{"not an object", `"just a string"`, "body is not a valid JSON object: json: cannot unmarshal string"},
		{"a non-empty array", `[1]`, "body is not a valid JSON object: json: cannot unmarshal array"},
		{"two objects", `{} {}`, "body is not a valid JSON object: data after the JSON value"},
		{"brackets after the object", `{"tag": "x"}]]]`, "body is not a valid JSON object: data after the JSON value"},
		{"braces after the object", `{"tag": "x"}}}`, "body is not a valid JSON object: data after the JSON value"},
		{"unknown field", `{"hook": "http://x"}`, `body is not a valid JSON object: json: unknown field "hook"`},
		{"field name in capitals", `{"TAG": "x"}`, `body is not a valid JSON object: json: unknown field "TAG"`},
		{"field name in another case", `{"Subscriber_Message_Hook_Url": "http://x"}`, `json: unknown field "Subscriber_Message_Hook_Url"`},
		{"hook of the wrong type", `{"subscriber_message_hook_url": 5}`, "subscriber_message_hook_url must be a string or null"},
		{"tag of the wrong type", `{"tag": ["a"]}`, "tag must be a string or null"},
		{"file scheme", `{"subscriber_message_hook_url": "file:///etc/passwd"}`, `scheme "file" is not allowed, use http or https`},
		{"gopher scheme", `{"subscriber_message_hook_url": "gopher://example.com/1"}`, `scheme "gopher" is not allowed`},
		{"javascript scheme", `{"subscriber_message_hook_url": "javascript:alert(1)"}`, `scheme "javascript" is not allowed`},
		{"http without host", `{"subscriber_message_hook_url": "http:///hook"}`, "is not a valid URL"},
		{"space in the host", `{"subscriber_message_hook_url": "http://exa mple.com/"}`, "is not a valid URL"},
		{"space without scheme", `{"subscriber_message_hook_url": "exa mple.com"}`, "is not a valid URL"},
		{"only a path", `{"subscriber_message_hook_url": "/hook.php"}`, "is not a valid URL"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := d.in(t)
			for _, r := range []struct{ method, path string }{
				{"POST", "/channel/prepare"},
				{"PATCH", "/channel/edit/" + ch.PublisherToken},
			} {
				var got struct{ Type, Message string }
				d.mustCall(r.method, r.path, tc.body, 400, &got)
				if got.Type != "ERR" || !strings.Contains(got.Message, tc.message) {
					t.Errorf("%s %s: %+v, want a message containing %q", r.method, r.path, got, tc.message)
				}
			}
			if after := d.mustCall("GET", "/channel", "", 200, nil); after != before {
				t.Errorf("channels changed:\n%s\n%s", before, after)
			}
		})
	}
}

func TestHookURLsAreKeptAsGiven(t *testing.T) {
	d := startDaemon(t)
	for _, hook := range []string{
		"domain.com",
		"domain.com/log.php",
		"localhost:8080/hook",
		"127.0.0.1:9000",
		"[::1]:9000/x",
		"http://localhost/log.php",
		"HTTPS://Example.com/Hook?x=1&y=2",
	} {
		ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook))
		if ch.HookURL == nil || *ch.HookURL != hook {
			t.Errorf("hook %q echoed as %v", hook, ch.HookURL)
		}
	}
	// PHP's json_encode of an empty options array is [].
	if ch := d.prepare(`[]`); ch.HookURL != nil || ch.Tag != nil {
		t.Errorf("prepare with [] made %+v", ch)
	}
}

func TestBodiesAreLimited(t *testing.T) {
	d := startDaemon(t, "-max-request-bytes", "2048", "-max-message-bytes", "4096")
	ch := d.prepare("")
	tag := func(n int) string { return `{"tag":"` + strings.Repeat("a", n-10) + `"}` } // n bytes of JSON
	for _, r := range []struct {
		method, path string
		limit        int
		body         func(int) string
	}{
		{"POST", "/channel/prepare", 2048, tag},
		{"PATCH", "/channel/edit/" + ch.PublisherToken, 2048, tag},
		{"POST", "/channel/publish/" + ch.PublisherToken, 4096, func(n int) string { return strings.Repeat("m", n) }},
	} {
		d.mustCall(r.method, r.path, r.body(r.limit), 200, nil)
		// With a Content-Length, and chunked without one.
		var got struct{ Type, Message string }
		d.mustCall(r.method, r.path, r.body(r.limit+1), 413, &got)
		if got.Type != "ERR" || got.Message != fmt.Sprintf("body is larger than %d bytes", r.limit) {
			t.Errorf("%s %s: %+v", r.method, r.path, got)
		}
		for _, n := range []int{r.limit, r.limit + 1} { // a body of unknown length is read another way
			req, err := http.NewRequest(r.method, d.url+r.path, io.MultiReader(strings.NewReader(r.body(n))))
			if err != nil {
				t.Fatal(err)
			}
			req.Host = "localhost"
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if want := map[bool]int{true: 200, false: 413}[n == r.limit]; resp.StatusCode != want || req.ContentLength != 0 {
				t.Errorf("%s %s chunked, %d bytes: %d, want %d (Content-Length %d)", r.method, r.path, n, resp.StatusCode, want, req.ContentLength)
			}
		}
	}
}

// ---- Frames from subscribers ----

func TestSubscriberFramesAreCheckedAndReassembled(t *testing.T) {
	const limit = 5*payloadChunk + 3 // read in growing pieces
	hook := startHook(t, nil)
	d := startDaemon(t, "-max-message-bytes", fmt.Sprint(limit))
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))

	c := d.dial(ch.SubscriberToken)
	largest := make([]byte, limit)
	rand.Read(largest)
	c.send(true, websocket.BinaryFrame, largest)
	if r := recv(t, hook.requests, "largest frame"); r.body != string(largest) {
		t.Errorf("hook got %d bytes, not the %d sent", len(r.body), limit)
	}
	c.send(false, websocket.BinaryFrame, largest[:10])
	c.send(false, websocket.ContinuationFrame, largest[10:payloadChunk+1])
	c.send(true, websocket.ContinuationFrame, largest[payloadChunk+1:])
	if r := recv(t, hook.requests, "largest message in fragments"); r.body != string(largest) {
		t.Errorf("hook got %d bytes, not the %d sent", len(r.body), limit)
	}
	c.send(false, websocket.TextFrame, []byte("frag"))
	c.send(true, websocket.PingFrame, []byte("between fragments"))
	if op, p := c.frame(); op != websocket.PongFrame || string(p) != "between fragments" {
		t.Fatalf("ping answered with %d %q", op, p)
	}
	c.send(false, websocket.ContinuationFrame, []byte("men"))
	c.send(true, websocket.ContinuationFrame, []byte("ted"))
	if r := recv(t, hook.requests, "reassembled frame"); r.body != "fragmented" {
		t.Errorf("hook got %q, want \"fragmented\"", r.body)
	}

	tests := []struct {
		name  string
		send  func(c *wsClient)
		close int
	}{
		{"too big", func(c *wsClient) { c.send(true, websocket.BinaryFrame, make([]byte, limit+1)) }, closeTooBig},
		{"much too big", func(c *wsClient) { c.send(true, websocket.BinaryFrame, make([]byte, 4<<20)) }, closeTooBig},
		{"too big in fragments", func(c *wsClient) {
			c.send(false, websocket.BinaryFrame, make([]byte, limit/2+1))
			c.send(true, websocket.ContinuationFrame, make([]byte, limit/2+1))
		}, closeTooBig},
		{"not UTF-8", func(c *wsClient) { c.send(true, websocket.TextFrame, []byte{0xff, 0xfe}) }, closeInvalidData},
		{"unmasked", func(c *wsClient) { c.sendFrame(true, websocket.TextFrame, []byte("x"), false) }, closeProtocolError},
		{"continuation first", func(c *wsClient) { c.send(true, websocket.ContinuationFrame, []byte("x")) }, closeProtocolError},
		{"unknown opcode", func(c *wsClient) { c.send(true, 3, []byte("x")) }, closeProtocolError},
		{"fragmented ping", func(c *wsClient) { c.send(false, websocket.PingFrame, []byte("x")) }, closeProtocolError},
		{"unmasked close", func(c *wsClient) { c.sendFrame(true, websocket.CloseFrame, closePayload(closeNormal), false) }, closeProtocolError},
		{"one-byte close", func(c *wsClient) { c.send(true, websocket.CloseFrame, []byte{3}) }, closeProtocolError},
		{"close reason not UTF-8", func(c *wsClient) {
			c.send(true, websocket.CloseFrame, append(closePayload(closeNormal), "bye \xff"...))
		}, closeInvalidData},
		{"64-bit length with its top bit set", func(c *wsClient) {
			// 2^63 + 5 bytes, which RFC 6455 forbids; x/net would read 5.
			c.conn.Write([]byte{0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4, 'h', 'e', 'l', 'l', 'o'})
		}, closeProtocolError},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := d.in(t)
			c := d.dial(ch.SubscriberToken)
			tc.send(c)
			c.expectClose(tc.close)
			if n := d.listeners(ch.PublisherToken); n != 1 {
				t.Errorf("listeners = %d, want 1 (the first client)", n)
			}
		})
	}
}

// TestFrameHeadersCostOnlyWhatArrives opens connections that each send a
// frame header declaring a message of the largest size allowed, and then
// nothing: what they cost must grow with the bytes that came, not with what
// the headers declared. The bound is the issue's: 4,000 such connections
// under 100 MB in all, about 25 KB each, this test's clients included. It
// measures after every batch, so that a reader that believes the header
// fails early instead of taking gigabytes.
func TestFrameHeadersCostOnlyWhatArrives(t *testing.T) {
	const perConnection = 100e6 / 4000
	for _, tc := range []struct {
		limit        int64
		conns, batch int
	}{
		{1 << 20, 4000, 500},
		{64 << 20, 200, 10}, // -max-message-bytes at its largest
	} {
		t.Run(fmt.Sprint(tc.limit), func(t *testing.T) {
			d := startDaemon(t, "-max-message-bytes", fmt.Sprint(tc.limit), "-log-level", "2")
			ch := d.prepare("")
			u, _ := url.Parse(d.wsURL(ch.SubscriberToken))
			// A ping, answered once the reader has reached the frame after
			// it, then the header of a frame of limit bytes: 14 bytes.
			header := []byte{0x89, 0x80, 1, 2, 3, 4, 0x82, 0xff}
			header = binary.BigEndian.AppendUint64(header, uint64(tc.limit))
			header = append(header, 1, 2, 3, 4)
			conns := make([]net.Conn, 0, tc.conns)
			defer func() {
				for _, c := range conns {
					c.Close()
				}
			}()
			base, cost := liveBytes(), int64(0)
			for len(conns) < tc.conns {
				for range tc.batch {
					conn, err := net.Dial("tcp", u.Host)
					if err != nil {
						t.Fatal(err)
					}
					conns = append(conns, conn)
					if c, resp := handshake(t, conn, u, nil); c == nil {
						t.Fatalf("subscribe: %s", resp.Status)
					}
					if _, err := conn.Write(header); err != nil {
						t.Fatal(err)
					}
				}
				for _, conn := range conns[len(conns)-tc.batch:] {
					var pong [2]byte
					if _, err := io.ReadFull(conn, pong[:]); err != nil || pong != [2]byte{0x8a, 0} {
						t.Fatalf("pong: % x %v", pong, err)
					}
				}
				cost = int64(liveBytes()) - int64(base)
				if cost > perConnection*int64(len(conns)) {
					t.Fatalf("%d connections cost %d MB, more than %d B each", len(conns), cost/1e6, int64(perConnection))
				}
			}
			t.Logf("%d connections declaring %d bytes each: %d KB in all, %d B each", len(conns), tc.limit, cost/1000, cost/int64(len(conns)))
		})
	}
}

// liveBytes is the heap in use after a collection, with the goroutine
// stacks: what the process holds, by the Go runtime's count.
func liveBytes() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc + ms.StackInuse
}

// ---- Limits and timeouts ----

func TestSlowlorisIsCutOff(t *testing.T) {
	d := startDaemon(t, "-read-header-timeout", "200ms", "-read-timeout", "400ms")
	ch := d.prepare("")
	for _, tc := range []struct{ name, request string }{
		{"headers never finished", "GET /channel HTTP/1.1\r\nHost: localhost\r\nX-Slow: "},
		{"body never finished", "POST /channel/publish/" + ch.PublisherToken + " HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nhalf"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", strings.TrimPrefix(d.url, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			start := time.Now()
			if _, err := io.WriteString(conn, tc.request); err != nil {
				t.Fatal(err)
			}
			conn.SetReadDeadline(time.Now().Add(waitTimeout))
			// The server may say why before it hangs up; either way it hangs up.
			if _, err := io.Copy(io.Discard, conn); err != nil {
				t.Fatalf("connection not closed by the server: %v", err)
			}
			if elapsed := time.Since(start); elapsed < 200*time.Millisecond {
				t.Errorf("closed after %v, before the timeout", elapsed)
			}
		})
	}
}

func TestHeadersTooLargeAre431(t *testing.T) {
	d := startDaemon(t, "-max-header-bytes", "1024")
	req, _ := http.NewRequest("GET", d.url+"/channel", nil)
	req.Host = "localhost"
	req.Header.Set("X-Big", strings.Repeat("h", 8<<10)) // net/http allows 4 KiB over the limit
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("status %d, want 431", resp.StatusCode)
	}
}

func TestServerTimeoutsDoNotCutWebSockets(t *testing.T) {
	d := startDaemonWith(t, func(c *config) { c.pingInterval = 50 * time.Millisecond },
		"-read-timeout", "100ms", "-write-timeout", "100ms", "-idle-timeout", "100ms")
	ch := d.prepare("")
	c := d.dial(ch.SubscriberToken)
	for range 10 { // half a second: five times the timeouts
		if op, p := c.frame(); op == websocket.PingFrame {
			c.send(true, websocket.PongFrame, p)
		}
	}
	d.publish(ch.PublisherToken, "still connected")
	c.expectText("still connected")
}

// ---- Slow subscribers ----

func TestSlowSubscriberIsDroppedOthersGetEverything(t *testing.T) {
	const readers, messages = 20, 2000
	d := startDaemonWith(t, func(c *config) { c.sendQueue = 128 })
	ch := d.prepare("")

	// A subscriber that never reads, with a tiny receive buffer.
	small := &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return errors.Join(err, serr)
	}}
	slow, _ := dialWSWith(t, small, d.wsURL(ch.SubscriberToken), nil)
	if slow == nil {
		t.Fatal("slow subscriber not connected")
	}

	var wg sync.WaitGroup
	for r := range readers {
		ws := d.subscribe(ch.SubscriberToken)
		wg.Go(func() {
			for i := range messages {
				got := receive(t, ws)
				if want := strconv.Itoa(i) + ":"; !strings.HasPrefix(got, want) {
					t.Errorf("reader %d: message %d starts %.12q, want %q", r, i, got, want)
					return
				}
			}
		})
	}

	payload := strings.Repeat("x", 4096)
	var slowest time.Duration
	for i := range messages {
		start := time.Now()
		d.publish(ch.PublisherToken, strconv.Itoa(i)+":"+payload)
		slowest = max(slowest, time.Since(start))
	}
	wg.Wait()
	t.Logf("slowest of %d publishes: %v", messages, slowest)
	if slowest > time.Second {
		t.Errorf("a publish took %v: publishers waited for the slow subscriber", slowest)
	}
	if n := d.hub.stats.slowDisconnects.Load(); n != 1 {
		t.Errorf("%d slow subscribers disconnected, want 1", n)
	}
	if n := d.listeners(ch.PublisherToken); n != readers {
		t.Errorf("listeners = %d, want the %d readers", n, readers)
	}
	if !strings.Contains(d.logs.String(), `level=WARN msg="subscriber too slow: disconnected"`) {
		t.Errorf("no warning for the slow subscriber:\n%s", d.logs)
	}
	// Its write under way was cut (it never read), so no close frame can
	// follow: what it gets is what the kernel held, then the end.
	slow.conn.SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := io.Copy(io.Discard, slow.br); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("slow subscriber's connection not ended: %v", err)
	}
}

// ---- Hooks a backend can trust ----

func TestHookFailsHangsAndRecovers(t *testing.T) {
	d := startDaemonWith(t, func(c *config) {
		c.hook = hookPolicy{timeout: 200 * time.Millisecond, attempts: 5, backoffMin: 10 * time.Millisecond, backoffMax: 40 * time.Millisecond}
	}, "-hook-secret", "s3cret")
	var calls atomic.Int32
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	hook := startHook(t, func(r *http.Request) int {
		switch calls.Add(1) {
		case 1:
			return http.StatusInternalServerError
		case 2: // hangs past the hook timeout; the daemon has given up on it
			select {
			case <-release:
			case <-r.Context().Done():
			}
			return http.StatusGatewayTimeout
		case 3:
			return http.StatusBadGateway
		}
		return http.StatusOK
	})
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))
	ws := d.subscribe(ch.SubscriberToken)
	for i := range 5 {
		if err := websocket.Message.Send(ws, fmt.Sprint("frame ", i)); err != nil {
			t.Fatal(err)
		}
	}
	deliveryIDs := map[string]bool{}
	for i := range 5 {
		r := recv(t, hook.requests, "hook request")
		if want := fmt.Sprint("frame ", i); r.body != want {
			t.Fatalf("hook got %q, want %q", r.body, want)
		}
		if got := r.header.Get("X-Gockets-Channel"); got != ch.SubscriberToken {
			t.Errorf("X-Gockets-Channel %q, want the subscriber token", got)
		}
		ts := r.header.Get("X-Gockets-Timestamp")
		if sec, err := strconv.ParseInt(ts, 10, 64); err != nil || time.Since(time.Unix(sec, 0)).Abs() > time.Minute {
			t.Errorf("X-Gockets-Timestamp %q", ts)
		}
		if got, want := r.header.Get("X-Gockets-Signature"), "sha256="+hmacHex("s3cret", ts+"\n"+ch.SubscriberToken+"\n\n"+r.header.Get("X-Gockets-Delivery-Id")+"\ntext/plain; charset=utf-8\n"+r.body); got != want {
			t.Errorf("X-Gockets-Signature %q, want %q", got, want)
		}
		if id := r.header.Get("X-Gockets-Delivery-Id"); !strings.HasSuffix(id, fmt.Sprintf(".1.%d", i+1)) || deliveryIDs[id] {
			t.Errorf("X-Gockets-Delivery-Id %q: not unique per frame", id)
		}
		deliveryIDs[r.header.Get("X-Gockets-Delivery-Id")] = true
	}
	st := &d.hub.stats
	waitFor(t, "the last delivery to be counted", func() bool { return st.hookDelivered.Load() == 5 })
	if st.hookDelivered.Load() != 5 || st.hookRetried.Load() != 3 || st.hookFailed.Load() != 0 {
		t.Errorf("delivered %d, retried %d, failed %d; want 5, 3, 0", st.hookDelivered.Load(), st.hookRetried.Load(), st.hookFailed.Load())
	}
}

// hmacHex is the hex HMAC-SHA256 of data under secret.
func hmacHex(secret, data string) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(data))
	return hex.EncodeToString(mac.Sum(nil))
}

// readmePHPHook is the PHP verification in the README's Hooks section.
func readmePHPHook(t *testing.T) string {
	t.Helper()
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, hooks, ok := strings.Cut(string(readme), "\n## Hooks\n")
	hooks, _, _ = strings.Cut(hooks, "\n## ")
	_, code, found := strings.Cut(hooks, "```php\n")
	code, _, closed := strings.Cut(code, "```")
	if !ok || !found || !closed {
		t.Fatal("README.md has no php code block in its Hooks section")
	}
	return code
}

// TestPHPVerifiesTheREADMEsSignature runs the README's PHP hook with
// php-cli's server against requests the daemon signed, as they came and
// with one part changed.
func TestPHPVerifiesTheREADMEsSignature(t *testing.T) {
	php := lookPHP(t)
	const secret = "php-s3cret"
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "hook.php"), []byte(readmePHPHook(t)), 0o600)
	phpURL, _ := startPHPServerIn(t, php, []string{"GOCKETS_HOOK_SECRET=" + secret}, dir)
	verify := func(r hookRequest, change func(http.Header, *string)) int {
		t.Helper()
		header, body := r.header.Clone(), r.body
		change(header, &body)
		req, _ := http.NewRequest("POST", phpURL+"/hook.php", strings.NewReader(body))
		for _, name := range []string{"Content-Type", "X-Gockets-Channel", "X-Gockets-Delivery-Id", "X-Gockets-Event", "X-Gockets-Timestamp", "X-Gockets-Signature"} {
			if v := header.Get(name); v != "" {
				req.Header.Set(name, v)
			}
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("POST to the PHP hook: %v", err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}

	hook := startHook(t, nil)
	d := startDaemon(t, "-hook-secret", secret, "-hook-events")
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))
	c := d.dial(ch.SubscriberToken)
	c.send(true, websocket.TextFrame, []byte(`{"event":"connect","channel":"`+ch.SubscriberToken+`"}`))
	c.send(true, websocket.BinaryFrame, []byte{0, 1, 2})
	connect, message, binaryMessage := recv(t, hook.requests, "connect event"), recv(t, hook.requests, "message"), recv(t, hook.requests, "binary message")
	for _, r := range []hookRequest{connect, message, binaryMessage} {
		if got := verify(r, func(http.Header, *string) {}); got != 200 {
			t.Errorf("the PHP hook answered %d to a request the daemon signed (%s), want 200", got, r.header)
		}
	}
	for _, tc := range []struct {
		name   string
		r      hookRequest
		change func(http.Header, *string)
	}{
		{"a message as a presence event", message, func(h http.Header, _ *string) { h.Set("X-Gockets-Event", "connect") }},
		{"a presence event as a message", connect, func(h http.Header, _ *string) { h.Del("X-Gockets-Event") }},
		{"another delivery id", message, func(h http.Header, _ *string) { h.Set("X-Gockets-Delivery-Id", h.Get("X-Gockets-Delivery-Id")+"0") }},
		{"another body", message, func(_ http.Header, body *string) { *body += " " }},
		{"another channel", message, func(h http.Header, _ *string) { h.Set("X-Gockets-Channel", ch.PublisherToken) }},
		{"binary as text", binaryMessage, func(h http.Header, _ *string) { h.Set("Content-Type", "text/plain; charset=utf-8") }},
		{"another timestamp", message, func(h http.Header, _ *string) { h.Set("X-Gockets-Timestamp", h.Get("X-Gockets-Timestamp")+"0") }},
		{"no signature", message, func(h http.Header, _ *string) { h.Del("X-Gockets-Signature") }},
	} {
		if got := verify(tc.r, tc.change); got != 401 {
			t.Errorf("%s: the PHP hook answered %d, want 401", tc.name, got)
		}
	}
}

func TestHookRedirectsAreNotFollowedAndSpentFramesDropped(t *testing.T) {
	d := startDaemonWith(t, func(c *config) {
		c.hook = hookPolicy{timeout: time.Second, attempts: 3, backoffMin: time.Millisecond, backoffMax: time.Millisecond}
	})
	elsewhere := startHook(t, nil)
	var calls atomic.Int32
	hook := startHook(t, func(r *http.Request) int {
		if calls.Add(1) <= 3 {
			return http.StatusServiceUnavailable
		}
		return http.StatusOK
	})
	redirecting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, elsewhere.url, http.StatusFound)
	}))
	t.Cleanup(redirecting.Close)

	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, redirecting.URL))
	ws := d.subscribe(ch.SubscriberToken)
	if err := websocket.Message.Send(ws, "redirected"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the redirected frame to be dropped", func() bool { return d.hub.stats.hookFailed.Load() == 1 })
	select {
	case r := <-elsewhere.requests:
		t.Errorf("the redirect was followed: %q", r.body)
	default:
	}

	d.mustCall("PATCH", "/channel/edit/"+ch.PublisherToken, fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url), 200, nil)
	for _, f := range []string{"spent", "delivered"} {
		if err := websocket.Message.Send(ws, f); err != nil {
			t.Fatal(err)
		}
	}
	// "spent" meets three 503s and is dropped; "delivered" gets through.
	if r := recv(t, hook.requests, "hook request"); r.body != "delivered" {
		t.Errorf("hook got %q, want \"delivered\"", r.body)
	}
	if n := d.hub.stats.hookFailed.Load(); n != 2 {
		t.Errorf("%d frames dropped, want 2", n)
	}
	if !strings.Contains(d.logs.String(), `msg="hook delivery failed: message dropped"`) || !strings.Contains(d.logs.String(), "attempt 3 of 3") {
		t.Errorf("drops not logged:\n%s", d.logs)
	}
}

// TestHookRetriesAsTheREADMESays measures the default retry policy, which
// the other hook tests replace by a faster one: a 5xx is tried 5 times in
// all, waiting 0.25 s, 0.5 s, 1 s and 2 s between the attempts, then
// dropped; a 4xx is tried once.
func TestHookRetriesAsTheREADMESays(t *testing.T) {
	type attempt struct {
		body string
		at   time.Time
	}
	attempts := make(chan attempt, 100)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		attempts <- attempt{string(body), time.Now()}
		switch string(body) {
		case "refused":
			w.WriteHeader(http.StatusBadRequest)
		case "spent":
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	t.Cleanup(hook.Close)
	d := startDaemon(t)
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.URL))
	c := d.dial(ch.SubscriberToken)
	// One connection's queue: each is posted once the one before is done.
	for _, m := range []string{"refused", "spent", "delivered"} {
		c.send(true, websocket.TextFrame, []byte(m))
	}
	var got []attempt
	for len(got) == 0 || got[len(got)-1].body != "delivered" {
		got = append(got, recv(t, attempts, "a hook attempt"))
	}
	var bodies []string
	for _, a := range got {
		bodies = append(bodies, a.body)
	}
	if want := []string{"refused", "spent", "spent", "spent", "spent", "spent", "delivered"}; !slices.Equal(bodies, want) {
		t.Fatalf("hook attempts %q, want %q", bodies, want)
	}
	// The waits between the attempts at "spent"; a POST to loopback adds
	// little, so each gap is its wait and at most a fifth of a second more.
	for i, wait := range []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second, 2 * time.Second} {
		gap := got[2+i].at.Sub(got[1+i].at)
		if gap < wait || gap > wait+200*time.Millisecond {
			t.Errorf("attempt %d came %v after attempt %d, want %v (and at most 200 ms more)", i+2, gap, i+1, wait)
		}
	}
	if n := d.hub.stats.hookFailed.Load(); n != 2 {
		t.Errorf("%d messages dropped, want 2 (the 4xx and the spent one)", n)
	}
	if logs := d.logs.String(); !strings.Contains(logs, "attempt 5 of 5") || !strings.Contains(logs, "attempt 1 of 5") {
		t.Errorf("the log does not say which attempt each drop came after:\n%s", logs)
	}
}

func TestHookQueueIsBounded(t *testing.T) {
	d := startDaemon(t)
	hook, unblock := startHangingHook(t)
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))
	c := d.dial(ch.SubscriberToken)
	const frames = hookQueueLimit + 10
	for i := range frames {
		c.send(true, websocket.TextFrame, []byte(strconv.Itoa(i)))
	}
	c.send(true, websocket.CloseFrame, closePayload(closeNormal))
	c.expectClose(closeNormal) // every frame before it has been read
	dropped := d.hub.stats.hookQueueFull.Load()
	if dropped < 9 || dropped > 10 {
		t.Errorf("%d frames dropped, want 9 or 10 (%d sent, one in flight, %d queued)", dropped, frames, hookQueueLimit)
	}
	if n := strings.Count(d.logs.String(), "hook queue full"); n != 1 {
		t.Errorf("queue full logged %d times, want once", n)
	}
	unblock()
	for i := range frames - int(dropped) {
		if r := recv(t, hook.requests, "queued frame"); r.body != strconv.Itoa(i) {
			t.Fatalf("frame %d reached the hook as %q", i, r.body)
		}
	}
}

// TestHookQueueHoldsFourMiBPerConnection: while the hook hangs, one
// connection's messages wait for it up to 4 MiB in all, the one being
// posted included; a message that would take it past 4 MiB is dropped,
// counted, and logged once. Far fewer than 256 messages are sent, so the
// bytes are the bound.
func TestHookQueueHoldsFourMiBPerConnection(t *testing.T) {
	d := startDaemon(t, "-hook-timeout", "1m")
	hook, unblock := startHangingHook(t)
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))
	c := d.dial(ch.SubscriberToken)
	// Four messages of 1 MiB less a byte, and one of 4 bytes: 4 MiB exactly.
	var kept []string
	for i := range 4 {
		kept = append(kept, strings.Repeat(strconv.Itoa(i), 1<<20-1))
	}
	kept = append(kept, "four")
	over := []string{"x", strings.Repeat("y", 1<<20-1), "z"} // each one past 4 MiB
	for _, m := range append(slices.Clone(kept), over...) {
		c.send(true, websocket.TextFrame, []byte(m))
	}
	c.send(true, websocket.CloseFrame, closePayload(closeNormal))
	c.expectClose(closeNormal) // every frame before it has been read
	if dropped := d.hub.stats.hookQueueFull.Load(); dropped != int64(len(over)) {
		t.Errorf("%d messages dropped for the connection's queue, want %d", dropped, len(over))
	}
	if m := scrape(t, d); m[`gockets_hook_dropped_total{reason="queue_full"}`] != int64(len(over)) || m["gockets_hook_queued_bytes"] != 4<<20 {
		t.Errorf("metrics: %d dropped for a full queue, %d bytes queued; want %d and %d",
			m[`gockets_hook_dropped_total{reason="queue_full"}`], m["gockets_hook_queued_bytes"], len(over), 4<<20)
	}
	if n := strings.Count(d.logs.String(), "hook queue full"); n != 1 {
		t.Errorf("queue full logged %d times, want once", n)
	}
	unblock()
	for i, want := range kept {
		if r := recv(t, hook.requests, "a kept message"); r.body != want {
			t.Fatalf("message %d reached the hook with %d bytes starting %.8q, want %d bytes starting %.8q", i, len(r.body), r.body, len(want), want)
		}
	}
	waitFor(t, "the queue to drain", func() bool { return d.hub.pendingHooks() == 0 })
	if len(hook.requests) != 0 {
		r := <-hook.requests
		t.Errorf("a dropped message reached the hook: %d bytes starting %.8q", len(r.body), r.body)
	}
}

// TestHookOrderHoldsPerConnectionWithFewWorkers: more subscribers than
// workers send at once; each one's messages reach the hook in order, and
// no more than hookPostsPerHost POSTs reach one host at a time.
func TestHookOrderHoldsPerConnectionWithFewWorkers(t *testing.T) {
	const subscribers, frames = 2 * hookPosts, 20
	var mu sync.Mutex
	var now, most int
	got := map[string][]string{} // by subscriber, from the delivery id
	// The first POSTs are held until the host's whole share is under way
	// at once (or a wait runs out), so that the cap is reached, not guessed.
	shareInUse := make(chan struct{})
	var useOnce sync.Once
	inUse := func() { useOnce.Do(func() { close(shareInUse) }) }
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		now++
		most = max(most, now)
		if now == hookPostsPerHost {
			inUse()
		}
		mu.Unlock()
		body, _ := io.ReadAll(r.Body)
		select {
		case <-shareInUse:
		case <-time.After(waitTimeout):
			inUse()
		}
		parts := strings.Split(r.Header.Get("X-Gockets-Delivery-Id"), ".")
		mu.Lock()
		now--
		got[parts[1]] = append(got[parts[1]], string(body))
		mu.Unlock()
	}))
	t.Cleanup(hook.Close)
	d := startDaemon(t)
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.URL))
	clients := make([]*wsClient, subscribers)
	for i := range clients {
		clients[i] = d.dial(ch.SubscriberToken)
	}
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Go(func() {
			for i := range frames {
				c.send(true, websocket.TextFrame, []byte(strconv.Itoa(i)))
			}
		})
	}
	wg.Wait()
	waitFor(t, "every message to reach the hook", func() bool { return d.hub.stats.hookDelivered.Load() == subscribers*frames })
	mu.Lock()
	defer mu.Unlock()
	if len(got) != subscribers {
		t.Errorf("messages from %d subscribers, want %d", len(got), subscribers)
	}
	for sub, bodies := range got {
		for i, b := range bodies {
			if b != strconv.Itoa(i) {
				t.Fatalf("subscriber %s: message %d reached the hook as %q: out of order", sub, i, b)
			}
		}
	}
	if most != hookPostsPerHost {
		t.Errorf("at most %d POSTs to one host at once, want exactly %d", most, hookPostsPerHost)
	}
	t.Logf("%d subscribers, %d messages each: at most %d POSTs at once", subscribers, frames, most)
}

// TestHookPostsAreBoundedInAllAndPerHost: five hooks that hang, each on a
// host of its own (127.0.0.1 on its own port: a host is scheme, host and
// port), and ten subscribers of each sending one message. Once the daemon
// can start no more POSTs (every message queued, every worker posting,
// every POST arrived), 32 are under way, at most 8 to one host; the others
// wait, and reach their hooks when these answer.
func TestHookPostsAreBoundedInAllAndPerHost(t *testing.T) {
	const posts, postsPerHost = 32, 8 // the README's figures
	const hosts, perHost = 5, 10      // 5 hosts x 8 would allow 40
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	var mu sync.Mutex
	var now, most, arrived int
	nowAt, mostAt := make([]int, hosts), make([]int, hosts)
	d := startDaemon(t, "-hook-timeout", "1m")
	var channels []channelJSON
	for i := range hosts {
		hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			mu.Lock()
			now, nowAt[i], arrived = now+1, nowAt[i]+1, arrived+1
			most, mostAt[i] = max(most, now), max(mostAt[i], nowAt[i])
			mu.Unlock()
			select {
			case <-release:
			case <-r.Context().Done():
			}
			mu.Lock()
			now, nowAt[i] = now-1, nowAt[i]-1
			mu.Unlock()
		}))
		t.Cleanup(hook.Close)
		channels = append(channels, d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.URL)))
	}
	t.Cleanup(unblock) // first: closing a hook, and the daemon's shutdown, wait for its POSTs
	for i, ch := range channels {
		for j := range perHost {
			c := d.dial(ch.SubscriberToken)
			c.send(true, websocket.TextFrame, []byte(fmt.Sprintf("host %d subscriber %d", i, j)))
		}
	}
	w := &d.hub.hookWork
	waitFor(t, "the daemon to start every POST it may", func() bool {
		w.mu.Lock()
		items, posting, workers := w.items, w.posting, w.workers
		w.mu.Unlock()
		mu.Lock()
		defer mu.Unlock()
		return items == hosts*perHost && posting == workers && arrived == posting
	})
	mu.Lock()
	t.Logf("POSTs under way: %d in all, by host %v", now, nowAt)
	if now != posts || most != posts {
		t.Errorf("%d POSTs under way, at most %d at once, want %d", now, most, posts)
	}
	for i, n := range mostAt {
		if n > postsPerHost {
			t.Errorf("host %d: %d POSTs at once, more than %d", i, n, postsPerHost)
		}
	}
	mu.Unlock()
	if m := scrape(t, d); m["gockets_hook_posts_in_flight"] != posts || m["gockets_hook_queued"] != hosts*perHost {
		t.Errorf("metrics: %d POSTs under way, %d queued; want %d and %d", m["gockets_hook_posts_in_flight"], m["gockets_hook_queued"], posts, hosts*perHost)
	}
	unblock()
	waitFor(t, "every message to reach its hook", func() bool { return d.hub.stats.hookDelivered.Load() == hosts*perHost })
	mu.Lock()
	defer mu.Unlock()
	if most != posts || arrived != hosts*perHost {
		t.Errorf("%d POSTs arrived, at most %d at once; want %d and %d", arrived, most, hosts*perHost, posts)
	}
}

// TestHookWorkIsBoundedForTheWholeDaemon is the attack of a client with one
// subscriber token against a hook that hangs: many connections, each
// sending 4 MB and closing, then fast connect-and-close cycles making
// presence events. The daemon, a child process with 1,024 open files,
// must keep its heap, goroutines and open files within the hook limits.
func TestHookWorkIsBoundedForTheWholeDaemon(t *testing.T) {
	hang := make(chan struct{})
	hookSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select { // hangs until the daemon gives up, or the test ends
		case <-r.Context().Done():
		case <-hang:
		}
	}))
	t.Cleanup(hookSrv.Close)
	p := startProcessWith(t, 1024, "-hook-events", "-log-level", "1")
	t.Cleanup(func() { close(hang) })
	ch := p.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hookSrv.URL))
	measure := func(when string) (goroutines, heap int64, files int) {
		m := scrape(t, p.daemon)
		goroutines, heap, files = m["go_goroutines"], m["go_memstats_heap_alloc_bytes"], p.openFiles()
		t.Logf("%s: %d goroutines, heap %d MiB, %d open files; hook queue %d messages, %d MiB, %d POSTs under way",
			when, goroutines, heap>>20, files, m["gockets_hook_queued"], m["gockets_hook_queued_bytes"]>>20, m["gockets_hook_posts_in_flight"])
		return
	}
	g0, heap0, files0 := measure("at start")
	within := func(when string) {
		t.Helper()
		g, heap, files := measure(when)
		// A hook host holds hookPostsPerHost workers, each with a
		// connection (two transport goroutines, one file).
		if limit := g0 + 3*hookPostsPerHost + 10; g > limit {
			t.Errorf("%s: %d goroutines, more than %d", when, g, limit)
		}
		// What waits for hooks, and the garbage of what was dropped: the
		// collector lets the heap grow to twice what is live.
		if limit := heap0 + 2*hookTotalBytes + 16<<20; heap > limit {
			t.Errorf("%s: heap %d MiB, more than %d MiB", when, heap>>20, limit>>20)
		}
		if limit := files0 + hookPostsPerHost + 8; files > limit {
			t.Errorf("%s: %d open files, more than %d", when, files, limit)
		}
		if status, _, body := p.call("GET", "/healthz", ""); status != 200 {
			t.Errorf("%s: /healthz answered %d %s", when, status, body)
		}
	}

	// A 64 KiB text frame, masked with a zero key so that it is built once.
	frame := binary.BigEndian.AppendUint64([]byte{0x80 | websocket.TextFrame, 0x80 | 127}, 64<<10)
	frame = append(append(frame, 0, 0, 0, 0), bytes.Repeat([]byte("x"), 64<<10)...)
	// 24 subscribers send more than the daemon-wide limit; GOCKETS_SOAK
	// runs the 100 of the issue that found the problem (25 s with -race).
	cycles := 24
	if os.Getenv("GOCKETS_SOAK") != "" {
		cycles = 100
	}
	start := time.Now()
	for range cycles { // connect, send 4 MB, close
		c := p.dial(ch.SubscriberToken)
		for range 64 {
			if _, err := c.conn.Write(frame); err != nil {
				t.Fatal(err)
			}
		}
		c.send(true, websocket.CloseFrame, closePayload(closeNormal))
		c.expectClose(closeNormal)
		c.conn.Close()
	}
	within(fmt.Sprintf("after %d subscribers sent 4 MB each (%v)", cycles, time.Since(start).Round(time.Millisecond)))
	start = time.Now()
	m := scrape(t, p.daemon)
	if m[`gockets_hook_dropped_total{reason="total_queue_full"}`] == 0 || m["gockets_hook_queued_bytes"] > hookTotalBytes {
		t.Errorf("nothing dropped for the daemon-wide limit, or over it: %d dropped, %d bytes queued",
			m[`gockets_hook_dropped_total{reason="total_queue_full"}`], m["gockets_hook_queued_bytes"])
	}
	if n := strings.Count(p.logs.String(), "hook queues of all subscribers full"); n != 1 {
		t.Errorf("the daemon-wide drops were logged %d times, want once", n)
	}

	u, _ := url.Parse(p.wsURL(ch.SubscriberToken))
	for range 1500 { // connect and close: two presence events each
		conn, err := net.Dial("tcp", u.Host)
		if err != nil {
			t.Fatal(err)
		}
		if c, resp := handshake(t, conn, u, nil); c == nil {
			t.Fatalf("subscribe: %s", resp.Status)
		}
		conn.Close()
	}
	waitFor(t, "every subscriber to be gone", func() bool { return p.listeners(ch.PublisherToken) == 0 })
	within(fmt.Sprintf("after 1,500 connect-and-close cycles (%v)", time.Since(start).Round(time.Millisecond)))
	if m := scrape(t, p.daemon); m["gockets_hook_queued"] > hookTotalLimit || m["gockets_hook_posts_in_flight"] > hookPostsPerHost {
		t.Errorf("hook work over its limits: %d queued, %d POSTs under way", m["gockets_hook_queued"], m["gockets_hook_posts_in_flight"])
	}
}

// ---- Backlog and channel TTL ----

func TestMessagesWaitForTheNextSubscriber(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	for i := range 3 {
		if r := d.publish(ch.PublisherToken, fmt.Sprint("early ", i)); !r.Queued || r.Subscribers != 0 {
			t.Fatalf("publish before any subscriber: %+v, want queued", r)
		}
	}
	c := d.dial(ch.SubscriberToken)
	for i := range 3 {
		c.expectText(fmt.Sprint("early ", i))
	}
	if r := d.publish(ch.PublisherToken, "live"); r.Queued || r.Subscribers != 1 {
		t.Errorf("publish with a subscriber: %+v", r)
	}
	c.expectText("live")
	// The next subscriber gets only what nobody has had.
	second := d.dial(ch.SubscriberToken)
	d.publish(ch.PublisherToken, "for both")
	second.expectText("for both")
	c.expectText("for both")
	if n := d.hub.stats.queued.Load(); n != 3 {
		t.Errorf("queued counter %d, want 3", n)
	}
}

// TestBacklogLongerThanTheSendQueueWaits: what a new subscriber's queue
// cannot take of the backlog (the newest) waits for the next subscriber.
func TestBacklogLongerThanTheSendQueueWaits(t *testing.T) {
	d := startDaemonWith(t, func(c *config) { c.sendQueue = 3 })
	ch := d.prepare("")
	for i := range 7 {
		if r := d.publish(ch.PublisherToken, fmt.Sprint("early ", i)); !r.Queued {
			t.Fatalf("publish before any subscriber: %+v, want queued", r)
		}
	}
	var subs []*wsClient
	for range 4 {
		subs = append(subs, d.dial(ch.SubscriberToken)) // joined when the upgrade is answered
	}
	d.mustCall("DELETE", "/channel/publish/"+ch.PublisherToken, "", 200, nil) // what is queued goes first
	for i, want := range [][]int{{0, 1, 2}, {3, 4, 5}, {6}, {}} {
		for _, n := range want {
			subs[i].expectText(fmt.Sprint("early ", n))
		}
		subs[i].expectClose(1000)
	}
}

// TestBacklogTheSendQueueLeftWaitsPastLivePublishes: what a new
// subscriber's queue could not take waits for the next subscriber, also
// when messages were delivered live in between.
func TestBacklogTheSendQueueLeftWaitsPastLivePublishes(t *testing.T) {
	d := startDaemonWith(t, func(c *config) { c.sendQueue = 3 })
	ch := d.prepare("")
	for i := range 5 {
		d.publish(ch.PublisherToken, fmt.Sprint("early ", i))
	}
	first := d.dial(ch.SubscriberToken)
	for i := range 3 {
		first.expectText(fmt.Sprint("early ", i))
	}
	// Its writer writes the pong after it is done with the three: then its
	// queue has room again, and the publish below does not find it full.
	first.send(true, websocket.PingFrame, []byte("done?"))
	if op, p := first.frame(); op != websocket.PongFrame || string(p) != "done?" {
		t.Fatalf("got frame %d %q, want the pong", op, p)
	}
	if r := d.publish(ch.PublisherToken, "live"); r.Subscribers != 1 || r.Queued {
		t.Fatalf("publish with a subscriber: %+v", r)
	}
	first.expectText("live")
	second := d.dial(ch.SubscriberToken)
	second.expectText("early 3")
	second.expectText("early 4")
	d.publish(ch.PublisherToken, "for both")
	second.expectText("for both")
	first.expectText("for both")
}

// TestResumeLeavesWhatItDidNotTakeForTheNextSubscriber: an EventSource that
// resumes takes what came after its Last-Event-ID, delivered or not, and
// only that: what was kept before that id waits for the next new
// subscriber, as if the resume had not been.
func TestResumeLeavesWhatItDidNotTakeForTheNextSubscriber(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	for i := range 2 {
		d.publish(ch.PublisherToken, fmt.Sprint("early ", i))
	}
	// An id beyond every message of the channel (a client's own, or one
	// from another daemon): nothing after it to resume.
	ahead := d.sse(ch.SubscriberToken, "18446744073709551615")
	if r := d.publish(ch.PublisherToken, "live"); r.Subscribers != 1 || r.Queued {
		t.Fatalf("publish with a subscriber: %+v", r)
	}
	live := ahead.message()
	if live.data != "live" {
		t.Fatalf("resumed ahead with %+v, want live", live)
	}
	ahead.conn.Close()
	waitFor(t, "the SSE subscriber to leave", func() bool { return d.listeners(ch.PublisherToken) == 0 })
	d.publish(ch.PublisherToken, "missed")
	behind := d.sse(ch.SubscriberToken, live.id) // takes what came after live
	if ev := behind.message(); ev.data != "missed" {
		t.Fatalf("resumed after live with %+v, want missed", ev)
	}
	behind.conn.Close()
	waitFor(t, "the SSE subscriber to leave", func() bool { return d.listeners(ch.PublisherToken) == 0 })
	d.publish(ch.PublisherToken, "late")
	c := d.dial(ch.SubscriberToken)
	for _, want := range []string{"early 0", "early 1", "late"} {
		c.expectText(want)
	}
	d.publish(ch.PublisherToken, "after")
	c.expectText("after") // nothing twice
}

func TestBacklogIsBoundedAndExpires(t *testing.T) {
	t.Run("bounded", func(t *testing.T) {
		d := startDaemon(t, "-backlog", "2")
		ch := d.prepare("")
		for i := range 3 {
			d.publish(ch.PublisherToken, fmt.Sprint(i))
		}
		c := d.dial(ch.SubscriberToken)
		c.expectText("1")
		c.expectText("2")
		if n := d.hub.stats.droppedBacklogFull.Load(); n != 1 {
			t.Errorf("dropped %d, want 1", n)
		}
	})
	t.Run("off", func(t *testing.T) {
		d := startDaemon(t, "-backlog", "0")
		ch := d.prepare("")
		got := d.mustCall("POST", "/channel/publish/"+ch.PublisherToken, "lost", 200, nil)
		if want := `{"type":"INF","message":"no subscriber is connected: message dropped (-backlog 0)","subscribers":0,"queued":false}` + "\n"; got != want {
			t.Errorf("publish = %s", got)
		}
		c := d.dial(ch.SubscriberToken)
		d.publish(ch.PublisherToken, "first seen")
		c.expectText("first seen")
	})
	t.Run("expires", func(t *testing.T) {
		d := startDaemon(t, "-backlog-ttl", "50ms")
		ch := d.prepare("")
		d.publish(ch.PublisherToken, "stale")
		waitFor(t, "the kept message to expire", func() bool { return d.hub.stats.droppedExpired.Load() == 1 })
		c := d.dial(ch.SubscriberToken)
		d.publish(ch.PublisherToken, "fresh")
		c.expectText("fresh")
	})
}

// TestBacklogKeepsTheLast100ByDefault: without -backlog, a channel nobody
// listens to keeps the last 100 messages, as the README says, and the
// next subscriber gets those, in order, and nothing older.
func TestBacklogKeepsTheLast100ByDefault(t *testing.T) {
	const kept = 100
	d := startDaemon(t)
	ch := d.prepare("")
	for i := range kept + 1 {
		if r := d.publish(ch.PublisherToken, fmt.Sprint("m", i)); !r.Queued || r.Subscribers != 0 {
			t.Fatalf("publish %d with nobody listening: %+v, want queued", i, r)
		}
	}
	c := d.dial(ch.SubscriberToken)
	for i := 1; i <= kept; i++ { // m0 made room for m100
		c.expectText(fmt.Sprint("m", i))
	}
	if r := d.publish(ch.PublisherToken, "live"); r.Queued || r.Subscribers != 1 {
		t.Fatalf("publish with a subscriber: %+v", r)
	}
	c.expectText("live") // nothing kept beyond the 100
	if n := d.hub.stats.droppedBacklogFull.Load(); n != 1 {
		t.Errorf("%d kept messages dropped for room, want 1", n)
	}
}

func TestIdleChannelsExpire(t *testing.T) {
	d := startDaemon(t, "-channel-ttl", "100ms")
	idle := d.prepare("")
	busy := d.prepare("")
	c := d.dial(busy.SubscriberToken)
	waitFor(t, "the idle channel to expire", func() bool {
		status, _, _ := d.call("GET", "/channel/"+idle.PublisherToken, "")
		return status == 404
	})
	if n := d.listeners(busy.PublisherToken); n != 1 {
		t.Fatalf("channel with a subscriber: listeners %d", n)
	}
	c.send(true, websocket.CloseFrame, closePayload(closeNormal))
	c.expectClose(closeNormal)
	waitFor(t, "the channel to expire once its subscriber left", func() bool {
		status, _, _ := d.call("GET", "/channel/"+busy.PublisherToken, "")
		return status == 404
	})
	if !strings.Contains(d.logs.String(), `msg="channel expired"`) {
		t.Errorf("expiry not logged:\n%s", d.logs)
	}
}

func TestChannelTTLIsOffByDefault(t *testing.T) {
	d := startDaemon(t, "-backlog-ttl", "20ms") // the janitor sweeps every 10 ms
	ch := d.prepare("")
	d.publish(ch.PublisherToken, "expires")
	// Once the kept message has expired, the janitor has looked at the
	// channel, idle for longer than that, and left it.
	waitFor(t, "the janitor to sweep", func() bool { return d.hub.stats.droppedExpired.Load() == 1 })
	if got := d.listeners(ch.PublisherToken); got != 0 {
		t.Errorf("listeners %d", got)
	}
}

// TestSubscribersAreLimitedAndTheAdminSideKeepsAnswering fills a daemon
// limited to 256 open files with subscribers: beyond its limits they are
// refused with 503, and the admin API and /healthz go on answering.
func TestSubscribersAreLimitedAndTheAdminSideKeepsAnswering(t *testing.T) {
	p := startProcessWith(t, 256, "-max-subscribers-per-channel", "100", "-log-level", "1")
	m := scrape(t, p.daemon)
	total, perChannel := m[`gockets_subscribers_limit{per="daemon"}`], m[`gockets_subscribers_limit{per="channel"}`]
	if total != 128 || perChannel != 100 {
		t.Fatalf("limits %d in all and %d per channel, want 128 (half of 256 files) and 100", total, perChannel)
	}
	a, b := p.prepare(""), p.prepare("")
	// fill subscribes until one is refused and returns the refusal.
	fill := func(ch channelJSON, clients *[]*wsClient) *http.Response {
		for range 300 {
			c, resp := dialWS(t, p.wsURL(ch.SubscriberToken), nil)
			if c == nil {
				return resp
			}
			*clients = append(*clients, c)
		}
		t.Fatal("300 subscribers and none refused")
		return nil
	}
	refused := func(resp *http.Response, want string) {
		t.Helper()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 503 || resp.Header.Get("Content-Type") != "application/json" || string(body) != `{"type":"ERR","message":"`+want+`"}`+"\n" {
			t.Errorf("refused subscriber: %s %q %s, want 503 JSON %q", resp.Status, resp.Header.Get("Content-Type"), body, want)
		}
	}
	var onA, onB []*wsClient
	refused(fill(a, &onA), "too many subscribers: this channel has its most, 100 (-max-subscribers-per-channel)")
	refused(fill(b, &onB), "too many subscribers: the daemon has its most, 128 (-max-subscribers)")
	if len(onA) != 100 || len(onB) != 28 {
		t.Errorf("%d and %d subscribers connected, want 100 and 28", len(onA), len(onB))
	}

	start := time.Now()
	if status, _, body := p.call("GET", "/healthz", ""); status != 200 {
		t.Errorf("/healthz with every subscriber slot taken: %d %s", status, body)
	}
	p.prepare(`{"tag": "still answered"}`)
	if r := p.publish(a.PublisherToken, "to all"); r.Subscribers != 100 {
		t.Errorf("publish reached %d subscribers, want 100", r.Subscribers)
	}
	t.Logf("with 128 subscribers on a daemon of 256 files, /healthz, prepare and publish answered in %v", time.Since(start))
	for _, c := range onA {
		c.expectText("to all")
	}
	m = scrape(t, p.daemon)
	if m[`gockets_subscribers_refused_total{reason="channel_full"}`] != 1 || m[`gockets_subscribers_refused_total{reason="daemon_full"}`] != 1 {
		t.Errorf("refusals counted %d (channel full) and %d (daemon full), want 1 and 1",
			m[`gockets_subscribers_refused_total{reason="channel_full"}`], m[`gockets_subscribers_refused_total{reason="daemon_full"}`])
	}

	// A subscriber that leaves gives its place back.
	onB[0].send(true, websocket.CloseFrame, closePayload(closeNormal))
	onB[0].expectClose(closeNormal)
	waitFor(t, "the place to be given back", func() bool {
		c, _ := dialWS(t, p.wsURL(b.SubscriberToken), nil)
		return c != nil
	})
}

// TestDefaultSubscriberLimitLeaves256Files: with 1,024 open files the
// default -max-subscribers is 1,024 less 256, 768 (the README's figure),
// and -max-subscribers-per-channel the same; the daemon holds all 768 and
// still answers the admin side with the files left over.
func TestDefaultSubscriberLimitLeaves256Files(t *testing.T) {
	const files, want = 1024, 768
	p := startProcessWith(t, files, "-log-level", "1")
	m := scrape(t, p.daemon)
	if total, perChannel := m[`gockets_subscribers_limit{per="daemon"}`], m[`gockets_subscribers_limit{per="channel"}`]; total != want || perChannel != want {
		t.Fatalf("limits %d in all and %d per channel with %d open files, want %d and %d", total, perChannel, files, want, want)
	}
	a, b := p.prepare(""), p.prepare("")
	var clients []*wsClient
	for i := range want {
		ch := a
		if i%2 == 1 {
			ch = b
		}
		c, resp := dialWS(t, p.wsURL(ch.SubscriberToken), nil)
		if c == nil {
			t.Fatalf("subscriber %d of %d refused: %s", i+1, want, resp.Status)
		}
		clients = append(clients, c)
	}
	for _, ch := range []channelJSON{a, b} {
		_, resp := dialWS(t, p.wsURL(ch.SubscriberToken), nil)
		if resp == nil || resp.StatusCode != 503 {
			t.Fatalf("subscriber %d was not refused: %v", want+1, resp)
		}
		body, _ := io.ReadAll(resp.Body)
		if wantBody := fmt.Sprintf(`{"type":"ERR","message":"too many subscribers: the daemon has its most, %d (-max-subscribers)"}`+"\n", want); string(body) != wantBody {
			t.Errorf("refused subscriber: %q, want %q", body, wantBody)
		}
	}
	if status, _, body := p.call("GET", "/healthz", ""); status != 200 {
		t.Errorf("/healthz with %d subscribers: %d %s", want, status, body)
	}
	if r := p.publish(a.PublisherToken, "to all"); r.Subscribers != want/2 {
		t.Errorf("publish reached %d subscribers, want %d", r.Subscribers, want/2)
	}
	clients[0].expectText("to all")
	t.Logf("%d subscribers on a daemon of %d files, which holds %d open", want, files, p.openFiles())
}

// ---- Channels survive restarts ----

// process is the real daemon in a child process (see TestMain).
type process struct {
	*daemon
	cmd    *exec.Cmd
	exited chan struct{} // closed once the process has ended
	err    error         // how it ended
}

func startProcess(t *testing.T, args ...string) *process {
	t.Helper()
	return startProcessWith(t, 0, args...)
}

// startProcessWith starts the daemon with an open-files limit (soft and
// hard) of openFiles, unless it is 0.
func startProcessWith(t *testing.T, openFiles int, args ...string) *process {
	t.Helper()
	setup := ""
	if openFiles > 0 {
		setup = fmt.Sprintf("ulimit -n %d", openFiles)
	}
	return startProcessAfter(t, setup, args...)
}

// startProcessAfter starts the daemon from a shell that first runs setup
// (such as ulimit or umask), unless it is empty.
func startProcessAfter(t *testing.T, setup string, args ...string) *process {
	t.Helper()
	args = append([]string{"-bind", "127.0.0.1", "-port", "0", "-log-level", "3"}, args...)
	cmd := exec.Command(os.Args[0], args...)
	if setup != "" {
		cmd = exec.Command("sh", append([]string{"-c", setup + ` && exec "$0" "$@"`, os.Args[0]}, args...)...)
	}
	// atexit_sleep_ms: under -race, do not linger a second after exiting.
	cmd.Env = append(os.Environ(), "GOCKETS_TEST_RUN_MAIN=1", "GORACE=atexit_sleep_ms=0")
	logs := &addrWatcher{addr: make(chan string, 1)}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start daemon: %v", err)
	}
	p := &process{cmd: cmd, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs)
		}
	})
	var addr string
	select {
	case addr = <-logs.addr:
	case <-p.exited:
		t.Fatalf("daemon exited at start: %v\n%s", p.err, logs)
	case <-time.After(waitTimeout):
		t.Fatal("daemon did not log its address")
	}
	_, port, _ := net.SplitHostPort(addr)
	p.daemon = &daemon{t: t, url: "http://127.0.0.1:" + port, logs: &logs.syncBuffer}
	return p
}

// openFiles counts the file descriptors the process has open.
func (p *process) openFiles() int {
	p.t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid))
	if err != nil {
		p.t.Fatalf("count open files: %v", err)
	}
	return len(fds)
}

// signal sends sig and returns how the process ended.
func (p *process) signal(sig os.Signal) error {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatal(err)
	}
	recv(p.t, p.exited, "the daemon to exit")
	return p.err
}

// savedChannels reads the channels a restart would find in state.
func savedChannels(state string) ([]storedChannel, error) {
	loaded, err := loadState(state, slog.New(slog.DiscardHandler))
	return loaded.channels, err
}

func TestChannelsSurviveKill9(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state.json")
	p := startProcess(t, "-state-file", state)
	a := p.prepare(`{"subscriber_message_hook_url": "domain.com", "tag": "a"}`)
	b := p.prepare(`{"tag": "b"}`)
	gone := p.prepare("")
	p.mustCall("PATCH", "/channel/edit/"+b.PublisherToken, `{"tag": "b2"}`, 200, nil)
	p.mustCall("DELETE", "/channel/publish/"+gone.PublisherToken, "", 200, nil)
	want := p.mustCall("GET", "/channel", "", 200, nil)

	if err := p.signal(syscall.SIGKILL); err == nil {
		t.Fatal("the daemon survived SIGKILL")
	}

	again := startProcess(t, "-state-file", state)
	if got := again.mustCall("GET", "/channel", "", 200, nil); got != want {
		t.Fatalf("after kill -9 and restart:\n got %s\nwant %s", got, want)
	}
	for _, ch := range []channelJSON{a, b} {
		if r := again.publish(ch.PublisherToken, "after restart"); !r.Queued {
			t.Errorf("publish with an old token: %+v", r)
		}
		c := again.dial(ch.SubscriberToken)
		c.expectText("after restart")
	}
}

// TestStateFilesAreOnlyTheOwners: the files of -state-file hold tokens, so
// each is created with mode 0600, whatever the umask lets through (the
// daemon runs with umask 0 here): the journal and the lock at the first
// change, the snapshot when the journal is full and at shutdown, and again
// when a restart writes over them.
func TestStateFilesAreOnlyTheOwners(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state.json")
	modes := func(when string, want ...string) {
		t.Helper()
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range entries {
			info, err := e.Info()
			if err != nil {
				t.Fatal(err)
			}
			names = append(names, e.Name())
			if mode := info.Mode(); mode != 0o600 {
				t.Errorf("%s: %s has mode %v, want -rw-------", when, e.Name(), mode)
			}
		}
		if !slices.Equal(names, want) {
			t.Errorf("%s: the state directory holds %q, want %q", when, names, want)
		}
	}

	p := startProcessAfter(t, "umask 0", "-state-file", state)
	p.prepare(`{"tag": "first"}`)
	modes("after the first change", "state.json.journal", "state.json.lock")

	// One more change than the journal holds: the snapshot is rewritten
	// while the daemon runs.
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for range journalLimit / 16 {
				p.prepare(`{"tag": "fill the journal"}`)
			}
		})
	}
	wg.Wait()
	if _, err := os.Stat(state); err != nil {
		t.Fatalf("no snapshot after %d changes: %v", journalLimit+1, err)
	}
	modes("after a rewrite while running", "state.json", "state.json.journal", "state.json.lock")
	if err := p.signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	modes("after the rewrite at shutdown", "state.json", "state.json.journal", "state.json.lock")

	again := startProcessAfter(t, "umask 0", "-state-file", state)
	again.prepare(`{"tag": "after restart"}`)
	if err := again.signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM after restart: %v", err)
	}
	modes("after a restart and its rewrite", "state.json", "state.json.journal", "state.json.lock")
	if saved, err := savedChannels(state); err != nil || len(saved) != journalLimit+2 {
		t.Errorf("state holds %d channels (%v), want %d", len(saved), err, journalLimit+2)
	}
}

func TestSIGTERMSavesStateAndExitsZero(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state.json")
	p := startProcess(t, "-state-file", state)
	ch := p.prepare(`{"tag": "kept"}`)
	c := p.dial(ch.SubscriberToken)
	stopped := make(chan error, 1)
	go func() { stopped <- p.signal(syscall.SIGTERM) }()
	c.expectClose(closeGoingAway)
	if err := recv(t, stopped, "exit"); err != nil {
		t.Fatalf("exit after SIGTERM: %v, want status 0", err)
	}
	var snap snapshot
	data, err := os.ReadFile(state)
	if err != nil || json.Unmarshal(data, &snap) != nil {
		t.Fatalf("state file after SIGTERM: %v\n%s", err, data)
	}
	if len(snap.Channels) != 1 || snap.Channels[0].PublisherToken != ch.PublisherToken || *snap.Channels[0].Tag != "kept" {
		t.Errorf("state file holds %+v", snap.Channels)
	}
	if journal, err := os.ReadFile(state + ".journal"); err != nil || len(journal) != 0 {
		t.Errorf("journal after a clean stop: %q, %v; want empty", journal, err)
	}
}

func TestCorruptStateStopsTheDaemon(t *testing.T) {
	tests := []struct {
		name, state, journal, want string
	}{
		{"not JSON", "{not json", "", "is corrupt"},
		{"unknown version", `{"version": 9, "seq": 0, "channels": []}`, "", "has version 9"},
		{"repeated token", `{"version": 1, "seq": 0, "channels": [
			{"publisher_token": "A", "subscriber_token": "B", "subscriber_message_hook_url": null, "tag": null},
			{"publisher_token": "A", "subscriber_token": "C", "subscriber_message_hook_url": null, "tag": null}]}`, "", "repeated token"},
		{"bad hook URL", `{"version": 1, "seq": 0, "channels": [
			{"publisher_token": "A", "subscriber_token": "B", "subscriber_message_hook_url": "file:///x", "tag": null}]}`, "", "scheme"},
		{"journal line", `{"version": 1, "seq": 0, "channels": []}`, "{\"seq\": 1, \"channel\": {}}\ngarbage\n", "corrupt at line 2"},
		{"a directory", "", "", "is a directory"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "state.json")
			if tc.name == "a directory" {
				os.Mkdir(state, 0o700)
			} else {
				os.WriteFile(state, []byte(tc.state), 0o600)
			}
			if tc.journal != "" {
				os.WriteFile(state+".journal", []byte(tc.journal), 0o600)
			}
			err := run(context.Background(), []string{"-bind", "127.0.0.1", "-port", "0", "-state-file", state}, func(string) string { return "" }, io.Discard, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("run = %v, want an error containing %q", err, tc.want)
			}
			if exitStatus(err) != 1 {
				t.Errorf("exit status %d, want 1", exitStatus(err))
			}
			if tc.name != "a directory" {
				if data, _ := os.ReadFile(state); string(data) != tc.state {
					t.Errorf("the state file was changed to %q", data)
				}
			}
		})
	}
}

func TestListenFailureReleasesTheStateFile(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state.json")
	err := run(context.Background(), []string{"-bind", "127.0.0.1", "-port", takenPort(t), "-state-file", state},
		func(string) string { return "" }, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "listen: ") {
		t.Fatalf("run on a taken port: %v", err)
	}
	// The daemon started again on a free port (systemd restarting it, say)
	// finds the state file unlocked.
	addr, _, _ := runDaemon(t, "-state-file", state)
	(&daemon{t: t, url: "http://" + addr}).prepare("")
}

func TestMissingStateStartsEmptyAndTornJournalLineIsIgnored(t *testing.T) {
	dir := t.TempDir()
	err := run(context.Background(), []string{"-bind", "127.0.0.1", "-port", "0", "-state-file", filepath.Join(dir, "no", "such", "dir", "s.json")}, func(string) string { return "" }, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "does not exist (create it, mode 0700)") {
		t.Errorf("state file in a missing directory: %v", err)
	}

	d := startDaemon(t, "-state-file", filepath.Join(dir, "new.json"))
	d.mustCall("GET", "/channel", "", 200, nil)

	state := filepath.Join(dir, "torn.json")
	os.WriteFile(state, []byte(`{"version": 1, "seq": 0, "channels": []}`), 0o600)
	os.WriteFile(state+".journal", []byte(`{"seq":1,"channel":{"publisher_token":"P","subscriber_token":"S","subscriber_message_hook_url":null,"tag":"whole"}}`+"\n"+`{"seq":2,"channel":{"publ`), 0o600)
	d = startDaemon(t, "-state-file", state)
	if got := d.mustCall("GET", "/channel", "", 200, nil); got != `{"channels":[{"publisher_token":"P","subscriber_token":"S","subscriber_message_hook_url":null,"tag":"whole","listeners":0}]}`+"\n" {
		t.Errorf("after a torn journal: %s", got)
	}
	if !strings.Contains(d.logs.String(), "partial line") {
		t.Errorf("torn line not logged:\n%s", d.logs)
	}
}

func TestDiskFullWhenSavingState(t *testing.T) {
	var full atomic.Bool
	state := filepath.Join(t.TempDir(), "state.json")
	d := startDaemonWith(t, func(c *config) {
		c.writeSynced = func(f *os.File, data []byte) error {
			if full.Load() {
				f.Write(data[:len(data)/2]) // what a full disk leaves behind
				return fmt.Errorf("write %s: %w", f.Name(), syscall.ENOSPC)
			}
			return writeSynced(f, data)
		}
	}, "-state-file", state)
	kept := d.prepare(`{"tag": "before"}`)
	before, _ := os.ReadFile(state + ".journal")
	snapshotBefore, _ := os.ReadFile(state)

	full.Store(true)
	var got struct{ Type, Message string }
	d.mustCall("POST", "/channel/prepare", `{"tag": "during"}`, 503, &got)
	if got.Type != "ERR" || !strings.Contains(got.Message, "no space left on device") {
		t.Errorf("prepare on a full disk: %+v", got)
	}
	if data, _ := os.ReadFile(state); !bytes.Equal(data, snapshotBefore) {
		t.Errorf("the snapshot changed: %s", data)
	}
	if after, _ := os.ReadFile(state + ".journal"); !bytes.HasPrefix(after, before) {
		t.Errorf("the journal lost what it held:\nbefore %q\nafter  %q", before, after)
	}
	// The store answers the request, then counts and logs.
	waitFor(t, "the failure to be counted and logged", func() bool {
		return d.hub.stats.stateSaveFailure.Load() >= 1 && strings.Contains(d.logs.String(), "state not saved; channels are kept in memory")
	})
	full.Store(false) // space is freed: the next retry writes everything
	seq := d.hub.store.lastSeq()
	// wait answers the last failure at once until a retry succeeds.
	waitFor(t, "the retry to save", func() bool { return d.hub.store.wait(context.Background(), seq) == nil })
	channels, err := savedChannels(state)
	if err != nil || len(channels) != 2 || channels[0].PublisherToken != kept.PublisherToken || *channels[1].Tag != "during" {
		t.Errorf("after the disk recovered: %+v, %v", channels, err)
	}
}

// fullDisk is a state store's writeSynced that fails, as on a full disk,
// while full is set, counting its attempts.
type fullDisk struct {
	full     atomic.Bool
	attempts atomic.Int64
	tried    chan time.Time // when set, each attempt on the full disk, if there is room
}

func (d *fullDisk) writeSynced(f *os.File, data []byte) error {
	if !d.full.Load() {
		return writeSynced(f, data)
	}
	d.attempts.Add(1)
	select {
	case d.tried <- time.Now():
	default:
	}
	f.Write(data[:len(data)/2]) // what a full disk leaves behind
	return fmt.Errorf("write %s: %w", f.Name(), syscall.ENOSPC)
}

func TestFullDiskIsRetriedByOneWriterAndLoggedOnce(t *testing.T) {
	disk := &fullDisk{}
	state := filepath.Join(t.TempDir(), "state.json")
	d := startDaemonWith(t, func(c *config) { c.writeSynced = disk.writeSynced }, "-state-file", state)
	disk.full.Store(true)
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Go(func() {
			var got struct{ Type, Message string }
			d.mustCall("POST", "/channel/prepare", fmt.Sprintf(`{"tag": "burst %d"}`, i), 503, &got)
			if !strings.Contains(got.Message, "no space left on device") {
				t.Errorf("prepare on a full disk: %+v", got)
			}
		})
	}
	wg.Wait()
	if n := disk.attempts.Load(); n != 1 {
		t.Errorf("10 changes on a full disk made %d attempts to write, want 1 (the retry comes after a pause)", n)
	}
	if n := strings.Count(d.logs.String(), "state not saved"); n != 1 {
		t.Errorf("the full disk was logged %d times, want once:\n%s", n, d.logs)
	}
	disk.full.Store(false)
	seq := d.hub.store.lastSeq()
	waitFor(t, "the retry to save", func() bool { return d.hub.store.wait(context.Background(), seq) == nil })
	if n := strings.Count(d.logs.String(), `msg="state saved again"`); n != 1 {
		t.Errorf("recovery logged %d times, want once:\n%s", n, d.logs)
	}
	if channels, err := savedChannels(state); err != nil || len(channels) != 10 {
		t.Errorf("after the disk recovered, the state holds %d channels (%v), want 10", len(channels), err)
	}
}

// The README: on a full disk one writer tries again after 1 s, then
// waits twice as long each time (up to 30 s, TestDefaultsAreTheREADMEs).
func TestFullDiskIsRetriedAfter1sThen2s(t *testing.T) {
	disk := &fullDisk{tried: make(chan time.Time, 8)}
	state := filepath.Join(t.TempDir(), "state.json")
	d := startDaemonWith(t, func(c *config) { c.writeSynced = disk.writeSynced }, "-state-file", state)
	disk.full.Store(true)
	d.mustCall("POST", "/channel/prepare", "", 503, nil)
	var at []time.Time
	for len(at) < 3 {
		select {
		case when := <-disk.tried:
			at = append(at, when)
		case <-time.After(5 * time.Second):
			t.Fatalf("attempts to save on a full disk: %d, want 3 within 5 s of each other", len(at))
		}
	}
	for i, want := range []time.Duration{time.Second, 2 * time.Second} {
		if got := at[i+1].Sub(at[i]); got < want || got > want+300*time.Millisecond {
			t.Errorf("pause %d before trying again: %v, want %v", i+1, got.Round(time.Millisecond), want)
		}
	}
	disk.full.Store(false)
}

func TestRestartOnAFullDiskServesWhatItRead(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state.json")
	// What kill -9 during a rewrite on a full disk leaves: a snapshot, a
	// journal ending in a torn line, and temporary snapshots full of tokens.
	os.WriteFile(state, []byte(`{"version": 1, "seq": 1, "channels": [{"publisher_token": "PA", "subscriber_token": "SA", "subscriber_message_hook_url": null, "tag": "a"}]}`), 0o600)
	os.WriteFile(state+".journal", []byte(`{"seq":2,"channel":{"publisher_token":"PB","subscriber_token":"SB","subscriber_message_hook_url":null,"tag":"b"}}`+"\n"+`{"seq":3,"chan`), 0o600)
	leftovers := []string{"state.json.tmp1234567", "state.json.tmp98"}
	kept := []string{"state.json.tmpl", "other.json.tmp123", "state.json.backup"}
	for _, name := range append(leftovers, kept...) {
		os.WriteFile(filepath.Join(dir, name), []byte(`{"channels": "tokens"}`), 0o600)
	}

	disk := &fullDisk{}
	disk.full.Store(true)
	d := startDaemonWith(t, func(c *config) { c.writeSynced = disk.writeSynced }, "-state-file", state)
	for _, name := range leftovers {
		if _, err := os.Stat(filepath.Join(dir, name)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("leftover %s not removed: %v", name, err)
		}
	}
	for _, name := range kept {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("%s, not ours, was removed: %v", name, err)
		}
	}
	if got := d.mustCall("GET", "/channel", "", 200, nil); got != `{"channels":[`+
		`{"publisher_token":"PA","subscriber_token":"SA","subscriber_message_hook_url":null,"tag":"a","listeners":0},`+
		`{"publisher_token":"PB","subscriber_token":"SB","subscriber_message_hook_url":null,"tag":"b","listeners":0}]}`+"\n" {
		t.Errorf("after a restart on a full disk: %s", got)
	}
	c := d.dial("SB")
	d.publish("PB", "served")
	c.expectText("served")
	d.mustCall("POST", "/channel/prepare", `{"tag": "c"}`, 503, nil)

	disk.full.Store(false)
	seq := d.hub.store.lastSeq()
	waitFor(t, "the retry to save", func() bool { return d.hub.store.wait(context.Background(), seq) == nil })
	d.prepare(`{"tag": "d"}`)
	channels, err := savedChannels(state) // what a kill -9 now would leave
	if err != nil || len(channels) != 4 || *channels[2].Tag != "c" || *channels[3].Tag != "d" {
		t.Errorf("state after the disk recovered: %+v, %v", channels, err)
	}
}

func TestStateChangesShareWrites(t *testing.T) {
	const channels, clients = 10000, 50
	var journalWrites, snapshotWrites atomic.Int64
	state := filepath.Join(t.TempDir(), "state.json")
	d := startDaemonWith(t, func(c *config) {
		c.writeSynced = func(f *os.File, data []byte) error {
			if strings.HasSuffix(f.Name(), ".journal") {
				journalWrites.Add(1)
			} else {
				snapshotWrites.Add(1)
			}
			return writeSynced(f, data)
		}
	}, "-state-file", state)
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for range channels / clients {
				d.prepare(`{"tag": "burst"}`)
			}
		})
	}
	wg.Wait()
	t.Logf("%d prepares: %d journal writes, %d snapshot writes", channels, journalWrites.Load(), snapshotWrites.Load())
	if n := snapshotWrites.Load(); n > channels/journalLimit+2 {
		t.Errorf("%d snapshot files written for %d prepares", n, channels)
	}
	if n := journalWrites.Load(); n >= channels {
		t.Errorf("%d journal writes for %d prepares: nothing was coalesced", n, channels)
	}
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	saved, err := savedChannels(state)
	if err != nil || len(saved) != channels {
		t.Errorf("state file holds %d channels (%v), want %d", len(saved), err, channels)
	}
}

// ---- Shutdown ----

func TestShutdownWaitsForQueuedHooks(t *testing.T) {
	d := startDaemon(t)
	hook := startHook(t, func(*http.Request) int {
		time.Sleep(50 * time.Millisecond) // a slow backend
		return http.StatusOK
	})
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))
	c := d.dial(ch.SubscriberToken)
	for i := range 5 {
		c.send(true, websocket.TextFrame, []byte(strconv.Itoa(i)))
	}
	c.send(true, websocket.CloseFrame, closePayload(closeNormal))
	c.expectClose(closeNormal)
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	if n := len(hook.requests); n != 5 {
		t.Errorf("%d of 5 queued frames reached the hook before shutdown returned", n)
	}
}

// ---- Fuzzing what clients control ----

func FuzzChannelOptions(f *testing.F) {
	for _, seed := range []string{
		"", "[]", "{}", "null", `"s"`, "[1]", "{} {}", "\xff",
		`{"subscriber_message_hook_url": "domain.com", "tag": "t"}`,
		`{"subscriber_message_hook_url": null, "tag": ""}`,
		`{"subscriber_message_hook_url": "file:///etc/passwd"}`,
		`{"subscriber_message_hook_url": "localhost:8080/x?y=1#z"}`,
		`{"tag": 5}`, `{"unknown": 1}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		opts, err := parseChannelOptions(body)
		if err != nil {
			return
		}
		if opts.hookURL != nil {
			checkTarget(t, *opts.hookURL, opts.hookTarget)
		}
		if opts.tag != nil && *opts.tag == "" || opts.hookURL != nil && *opts.hookURL == "" {
			t.Errorf("empty string kept instead of null: %+v", opts)
		}
	})
}

func FuzzHookTarget(f *testing.F) {
	for _, seed := range []string{
		"domain.com", "localhost:8080/hook", "127.0.0.1:9", "[::1]:9/x", "http://h/x", "HTTPS://H",
		"file:///etc/passwd", "gopher://x", "javascript:alert(1)", "mailto:a@b", "http:///x",
		"//host/x", "/path", "a b", "http://a b/", "ht!tp://x", "x:", ":80", "",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		if target, err := hookTarget(raw); err == nil {
			checkTarget(t, raw, target)
		}
	})
}

// checkTarget holds for every hook URL the daemon accepts: it is delivered
// over http or https to a valid host, and is the URL as given, or that URL
// with "http://" in front.
func checkTarget(t *testing.T, raw, target string) {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil || u.Scheme != "http" && u.Scheme != "https" || !validHost(u.Hostname()) {
		t.Errorf("hook %q accepted as %q (%v)", raw, target, err)
	}
	if target != raw && target != "http://"+raw {
		t.Errorf("hook %q became %q", raw, target)
	}
}

func FuzzAdminRequests(f *testing.F) {
	h := newTestHub(f)
	ch, _ := h.prepare(channelOptions{})
	for _, seed := range [][3]string{
		{"GET", "/channel", ""},
		{"GET", "/channel/" + ch.publisherToken, ""},
		{"GET", "/channel/show?search=" + url.QueryEscape("^a(b|c)*$"), ""},
		{"GET", "/channel/show?search=" + url.QueryEscape("("), ""},
		{"POST", "/channel/prepare", `{"subscriber_message_hook_url": "domain.com", "tag": "t"}`},
		{"PATCH", "/channel/edit/" + ch.publisherToken, `{"tag": null}`},
		{"POST", "/channel/publish/" + ch.publisherToken, "data"},
		{"DELETE", "/channel/publish/nope", ""},
		{"GET", "/channel/subscribe/" + ch.subscriberToken, ""},
		{"PUT", "/channel/prepare", ""},
		{"GET", "/channel/../channel", ""},
	} {
		f.Add(seed[0], seed[1], seed[2])
	}
	f.Fuzz(func(t *testing.T, method, target, body string) {
		req, err := http.NewRequest(method, "http://localhost"+target, strings.NewReader(body))
		if err != nil {
			return // not a request a client could send
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		switch rec.Code {
		case 200, 400, 403, 404, 405, 413, 505:
		default:
			t.Errorf("%s %q: status %d", method, target, rec.Code)
		}
		var v map[string]any
		if ct := rec.Header().Get("Content-Type"); ct != "application/json" || json.Unmarshal(rec.Body.Bytes(), &v) != nil {
			t.Errorf("%s %q: %d %q %q", method, target, rec.Code, ct, rec.Body)
		}
	})
}

func FuzzSubscriberFrames(f *testing.F) {
	frame := func(fin bool, opcode byte, payload string, masked bool) []byte {
		var buf bytes.Buffer
		c := &wsClient{t: f, conn: writerConn{&buf}}
		c.sendFrame(fin, opcode, []byte(payload), masked)
		return buf.Bytes()
	}
	for _, seed := range [][]byte{
		frame(true, websocket.TextFrame, "hello", true),
		append(frame(false, websocket.TextFrame, "he", true), frame(true, websocket.ContinuationFrame, "llo", true)...),
		frame(true, websocket.PingFrame, "p", true),
		frame(true, websocket.CloseFrame, "\x03\xe8", true),
		frame(true, websocket.TextFrame, "\xff", true),
		frame(true, websocket.TextFrame, "x", false),
		frame(true, websocket.BinaryFrame, strings.Repeat("b", 300), true),
		{0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4}, // 2^63-1 bytes
		{0x81},
		[]byte("GET / HTTP/1.1\r\n\r\n"),
	} {
		f.Add(seed)
	}
	d := startDaemon(f, "-max-message-bytes", "1024")
	ch := d.prepare("")
	f.Fuzz(func(t *testing.T, stream []byte) {
		c := d.in(t).dial(ch.SubscriberToken)
		if _, err := c.conn.Write(stream); err != nil {
			return // the daemon hung up already
		}
		c.conn.(*net.TCPConn).CloseWrite()
		// Whatever it was sent, the daemon ends the connection.
		c.conn.SetReadDeadline(time.Now().Add(waitTimeout))
		if _, err := io.Copy(io.Discard, c.br); err != nil && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("connection not ended: %v", err)
		}
	})
}

// writerConn is a net.Conn that only writes, to build frames for seeds.
type writerConn struct{ io.Writer }

func (writerConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (writerConn) Close() error                     { return nil }
func (writerConn) LocalAddr() net.Addr              { return nil }
func (writerConn) RemoteAddr() net.Addr             { return nil }
func (writerConn) SetDeadline(time.Time) error      { return nil }
func (writerConn) SetReadDeadline(time.Time) error  { return nil }
func (writerConn) SetWriteDeadline(time.Time) error { return nil }

// ---- Soak ----

// TestSoak churns channels, subscribers, publishes and hook frames for the
// duration in GOCKETS_SOAK, then checks that goroutines and heap come back
// to where they started. Skipped unless asked for:
//
//	GOCKETS_SOAK=60s go test -race -run Soak -v .
func TestSoak(t *testing.T) {
	duration, err := time.ParseDuration(os.Getenv("GOCKETS_SOAK"))
	if err != nil {
		t.Skip("set GOCKETS_SOAK to a duration, such as 60s, to run the soak test")
	}
	var hooked atomic.Int64
	hookSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		hooked.Add(1)
	}))
	t.Cleanup(hookSrv.Close)
	d := startDaemonWith(t, func(c *config) { c.pingInterval = 250 * time.Millisecond },
		"-log-level", "2", "-channel-ttl", "500ms", "-backlog-ttl", "200ms", "-state-file", filepath.Join(t.TempDir(), "state.json"))

	settle := func() (goroutines int, heap uint64) {
		http.DefaultClient.CloseIdleConnections()
		d.hub.hooks.CloseIdleConnections()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return runtime.NumGoroutine(), ms.HeapAlloc
	}
	g0, heap0 := settle()

	var ops struct{ channels, subscribers, publishes, frames, drops, deletes atomic.Int64 }
	deadline := time.Now().Add(duration)
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for i := 0; time.Now().Before(deadline); i++ {
				soakRound(t, d, hookSrv.URL, w+i, &ops.channels, &ops.subscribers, &ops.publishes, &ops.frames, &ops.drops, &ops.deletes)
			}
		})
	}
	wg.Wait()

	// Channels left to expire, subscribers to time out, hooks to drain.
	waitFor(t, "every channel to expire", func() bool { return len(d.hub.all()) == 0 })
	var g1 int
	var heap1 uint64
	waitFor(t, "goroutines to come back", func() bool {
		g1, heap1 = settle()
		return g1 <= g0
	})
	t.Logf("soak %v: %d channels, %d subscribers, %d publishes, %d frames to hooks (%d delivered), %d dropped connections, %d deletes",
		duration, ops.channels.Load(), ops.subscribers.Load(), ops.publishes.Load(), ops.frames.Load(), hooked.Load(), ops.drops.Load(), ops.deletes.Load())
	t.Logf("goroutines %d -> %d; heap %d KiB -> %d KiB", g0, g1, heap0>>10, heap1>>10)
	if heap1 > heap0+1<<20 {
		t.Errorf("heap grew from %d KiB to %d KiB", heap0>>10, heap1>>10)
	}
}

// soakRound is one channel's life: subscribers join, messages are
// published and received in order, frames go to the hook, then the channel
// ends one of four ways.
func soakRound(t *testing.T, d *daemon, hookURL string, n int, channels, subscribers, publishes, frames, drops, deletes *atomic.Int64) {
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hookURL))
	channels.Add(1)
	clients := make([]*wsClient, 1+n%3)
	u, _ := url.Parse(d.wsURL(ch.SubscriberToken))
	for i := range clients {
		conn, err := net.Dial("tcp", u.Host)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close() // not t.Cleanup: that would keep every connection until the end
		if clients[i], _ = handshake(t, conn, u, nil); clients[i] == nil {
			t.Fatal("subscribe refused")
		}
	}
	subscribers.Add(int64(len(clients)))
	for i := range 1 + n%10 {
		msg := fmt.Sprint("m", i)
		d.publish(ch.PublisherToken, msg)
		publishes.Add(1)
		for _, c := range clients {
			c.expectText(msg)
		}
	}
	clients[0].send(true, websocket.TextFrame, []byte("to the hook"))
	frames.Add(1)
	switch n % 4 {
	case 0: // clients close
		for _, c := range clients {
			c.send(true, websocket.CloseFrame, closePayload(closeNormal))
			c.expectClose(closeNormal)
		}
	case 1: // clients vanish
		for _, c := range clients {
			c.conn.Close()
		}
		drops.Add(int64(len(clients)))
	case 2: // the app deletes the channel
		d.mustCall("DELETE", "/channel/publish/"+ch.PublisherToken, "", 200, nil)
		deletes.Add(1)
		for _, c := range clients {
			c.expectClose(closeNormal)
		}
	case 3: // clients stop answering pings, and the channel is left to expire
		for _, c := range clients {
			for {
				if op, _ := c.frame(); op == websocket.CloseFrame {
					break
				}
			}
			c.conn.Close()
		}
	}
}

// ---- Security ----

// clientFrom is an HTTP client whose connections come from addr, another
// address of the loopback network.
func clientFrom(t *testing.T, addr string) *http.Client {
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(addr)}}
	transport := &http.Transport{DialContext: dialer.DialContext}
	t.Cleanup(transport.CloseIdleConnections)
	return &http.Client{Transport: transport}
}

func TestAdminRoutesNeedTokenAndAllowedAddress(t *testing.T) {
	const token = "correct-horse-battery-staple"
	near, far := clientFrom(t, "127.0.0.1"), clientFrom(t, "127.0.0.2")
	type attempt struct {
		name   string
		client *http.Client
		host   string
		auth   string
		want   int // 0: the route's own answer
	}
	configs := []struct {
		name     string
		args     []string
		attempts []attempt
	}{
		{"token", []string{"-admin-token", token}, []attempt{
			{"no credentials", near, "localhost", "", 401},
			{"wrong token", near, "localhost", "Bearer nope", 401},
			{"token without Bearer", near, "localhost", token, 401},
			{"right token", near, "localhost", "Bearer " + token, 0},
			{"right token, other address", far, "localhost", "Bearer " + token, 0},
			{"spoofed Host, no token", far, "localhost:8844", "", 401},
			{"right token, wrong Host", near, "evil.example", "Bearer " + token, 403},
		}},
		{"allow-list", []string{"-admin-allow", "127.0.0.1/32"}, []attempt{
			{"allowed address", near, "localhost", "", 0},
			{"disallowed address", far, "localhost", "", 403},
			{"spoofed Host, disallowed address", far, "LOCALHOST:1", "Bearer " + token, 403},
		}},
		{"both", []string{"-admin-token", token, "-admin-allow", "127.0.0.1"}, []attempt{
			{"no credentials", near, "localhost", "", 401},
			{"wrong token", near, "localhost", "bearer nope", 401},
			{"right token", near, "localhost", "bearer " + token, 0},
			{"allowed address, no token", near, "localhost", "", 401},
			{"disallowed address, right token", far, "localhost", "Bearer " + token, 403},
			{"spoofed Host", far, "localhost", "", 403},
		}},
	}
	for _, cfg := range configs {
		t.Run(cfg.name, func(t *testing.T) {
			d := startDaemon(t, cfg.args...)
			for _, route := range adminRoutes(d) {
				for _, a := range cfg.attempts {
					method, path, ok := route()
					status, header, body := d.request(a.client, method, path, "{}", func(r *http.Request) {
						r.Host = a.host
						if a.auth != "" {
							r.Header.Set("Authorization", a.auth)
						}
					})
					want := a.want
					if want == 0 {
						want = ok
					}
					if status != want {
						t.Errorf("%s %s, %s: %d %s; want %d", method, path, a.name, status, body, want)
					}
					if status == 401 && header.Get("WWW-Authenticate") != `Bearer realm="gockets"` {
						t.Errorf("401 without WWW-Authenticate: %q", header.Get("WWW-Authenticate"))
					}
					if ct := header.Get("Content-Type"); ct != "application/json" && (path != "/metrics" || status != 200) {
						t.Errorf("%s %s: Content-Type %q", method, path, ct)
					}
				}
			}
		})
	}
}

// adminRoutes lists every admin route; each call gives a request on a
// channel of its own (delete deletes it) and the status it answers when let in.
func adminRoutes(d *daemon) []func() (method, path string, ok int) {
	fresh := func() *channel {
		ch, _ := d.hub.prepare(channelOptions{})
		return ch
	}
	return []func() (string, string, int){
		func() (string, string, int) { return "POST", "/channel/prepare", 200 },
		func() (string, string, int) { return "GET", "/channel", 200 },
		func() (string, string, int) { return "GET", "/channel/" + fresh().publisherToken, 200 },
		func() (string, string, int) { return "POST", "/channel/publish/" + fresh().publisherToken, 200 },
		func() (string, string, int) { return "DELETE", "/channel/publish/" + fresh().publisherToken, 200 },
		func() (string, string, int) { return "GET", "/channel/show?search=x", 200 },
		func() (string, string, int) { return "GET", "/channel/show/" + fresh().publisherToken, 200 },
		func() (string, string, int) { return "PATCH", "/channel/edit/" + fresh().publisherToken, 200 },
		func() (string, string, int) { return "GET", "/metrics", 200 },
	}
}

func TestForwardedForCountsOnlyFromTrustedProxies(t *testing.T) {
	d := startDaemon(t, "-admin-allow", "10.0.0.0/8", "-trust-proxy", "127.0.0.2")
	proxy, other := clientFrom(t, "127.0.0.2"), clientFrom(t, "127.0.0.3")
	tests := []struct {
		name      string
		client    *http.Client
		forwarded []string
		want      int
	}{
		{"trusted proxy, allowed client", proxy, []string{"10.1.2.3"}, 200},
		{"trusted proxy, client spoofs the first hop", proxy, []string{"10.9.9.9, 192.0.2.7"}, 403},
		{"trusted proxy, disallowed client", proxy, []string{"192.0.2.7"}, 403},
		{"trusted proxy, two headers", proxy, []string{"192.0.2.7", "10.1.2.3"}, 200},
		{"trusted proxy, garbled header", proxy, []string{"10.1.2.3, not-an-ip"}, 403},
		{"trusted proxy, no header: the proxy itself", proxy, nil, 403},
		{"untrusted peer claims an allowed client", other, []string{"10.1.2.3"}, 403},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := d.in(t)
			status, _, body := d.request(tc.client, "GET", "/channel", "", func(r *http.Request) {
				for _, f := range tc.forwarded {
					r.Header.Add("X-Forwarded-For", f)
				}
			})
			if status != tc.want {
				t.Errorf("status %d %s, want %d", status, body, tc.want)
			}
		})
	}
}

// TestOpenAdminAPIIsWarnedAbout: tests listen on 127.0.0.1 only, so the
// warning's condition is tested on addresses, and the daemon once on loopback.
func TestOpenAdminAPIIsWarnedAbout(t *testing.T) {
	everywhere := &net.TCPAddr{IP: net.IPv6unspecified, Port: 8844}
	tests := []struct {
		args []string
		addr net.Addr
		warn bool
	}{
		{nil, everywhere, true},
		{nil, &net.TCPAddr{IP: net.IPv4zero, Port: 8844}, true},
		{nil, &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 8844}, true},
		{nil, &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 8844}, false},
		{nil, &net.TCPAddr{IP: net.IPv6loopback, Port: 8844}, false},
		{[]string{"-admin-token", "t"}, everywhere, false},
		{[]string{"-admin-allow", "127.0.0.1"}, everywhere, false},
	}
	for _, tc := range tests {
		cfg, err := parseConfig(tc.args, func(string) string { return "" }, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		if got := adminOpen(cfg, tc.addr); got != tc.warn {
			t.Errorf("%q on %v: adminOpen %v, want %v", tc.args, tc.addr, got, tc.warn)
		}
	}
	_, logs, _ := runDaemon(t)
	if strings.Contains(logs.String(), "the admin API is open") {
		t.Errorf("warned on loopback:\n%s", logs)
	}
}

func TestBindListensOnOneAddress(t *testing.T) {
	addr, _, _ := runDaemon(t)
	_, port, _ := net.SplitHostPort(addr)
	if conn, err := net.Dial("tcp", "127.0.0.1:"+port); err != nil {
		t.Errorf("not listening on 127.0.0.1: %v", err)
	} else {
		conn.Close()
	}
	if conn, err := net.Dial("tcp", "127.0.0.2:"+port); err == nil {
		conn.Close()
		t.Error("listening on 127.0.0.2 too")
	}
}

// TestRefusedOriginsAreLoggedSparingly: a browser hides the 403 from its
// page, so the log names the origin, at most once per refusalLogEvery.
func TestRefusedOriginsAreLoggedSparingly(t *testing.T) {
	d := startDaemon(t, "-allowed-origins", "https://app.example.com")
	ch := d.prepare("")
	for range 3 {
		if c, resp := dialWS(t, d.wsURL(ch.SubscriberToken), http.Header{"Origin": {"https://evil.example"}}); c != nil || resp.StatusCode != 403 {
			t.Fatalf("a refused origin subscribed: %v", resp)
		}
	}
	line := `level=WARN msg="subscriber refused: origin not in -allowed-origins" origin=https://evil.example refused_since_last_line=0`
	if got := strings.Count(d.logs.String(), line); got != 1 {
		t.Errorf("%d lines %q, want 1; log:\n%s", got, line, d.logs)
	}
}

func TestLogLimit(t *testing.T) {
	var l logLimit
	start := time.Now()
	for _, step := range []struct {
		after      time.Duration // since start
		ok         bool
		suppressed int
	}{
		{0, true, 0},
		{time.Second, false, 0},
		{9 * time.Second, false, 0},
		{10 * time.Second, true, 2},
		{11 * time.Second, false, 0},
		{time.Minute, true, 1},
		{time.Minute + 10*time.Second, true, 0},
	} {
		ok, suppressed := l.allow(start.Add(step.after), 10*time.Second)
		if ok != step.ok || suppressed != step.suppressed {
			t.Errorf("at %v: allow = %v, %d; want %v, %d", step.after, ok, suppressed, step.ok, step.suppressed)
		}
	}
}

func TestAllowedOriginsGuardSubscribe(t *testing.T) {
	d := startDaemon(t, "-allowed-origins", "https://*.example.com, http://localhost:8080,https://app.test")
	ch := d.prepare("")
	tests := []struct {
		origin string
		ok     bool
	}{
		{"", true}, // PHP, node, curl
		{"https://a.example.com", true},
		{"https://a.b.example.com", true},
		{"https://A.EXAMPLE.COM", true},
		{"https://example.com", false},
		{"https://evilexample.com", false},
		{"https://a.example.com.evil.org", false},
		{"http://a.example.com", false},
		{"https://a.example.com:8443", false},
		{"http://localhost:8080", true},
		{"http://localhost", false},
		{"https://app.test", true},
		{"https://app.test:443", true},
		{"null", false},
		{"https://app.test/path", false},
	}
	for _, tc := range tests {
		t.Run(tc.origin, func(t *testing.T) {
			header := http.Header{}
			if tc.origin != "" {
				header.Set("Origin", tc.origin)
			}
			c, resp := dialWS(t, d.wsURL(ch.SubscriberToken), header)
			if (c != nil) != tc.ok {
				t.Fatalf("origin %q: %s, want allowed=%v", tc.origin, resp.Status, tc.ok)
			}
			if c == nil {
				body, _ := io.ReadAll(resp.Body)
				if resp.StatusCode != 403 || resp.Header.Get("Content-Type") != "application/json" || !strings.Contains(string(body), "may not subscribe") {
					t.Errorf("refused with %s %q", resp.Status, body)
				}
			}
		})
	}
	for _, bad := range []string{"example.com", "ftp://x.org", "https://", "https://*.", "https://a.com/x"} {
		if _, err := parseConfig([]string{"-allowed-origins", bad}, func(string) string { return "" }, io.Discard); err == nil {
			t.Errorf("-allowed-origins %q accepted", bad)
		}
	}
}

// selfSigned writes a certificate for 127.0.0.1 and its key, and returns
// their paths and a pool that trusts it.
func selfSigned(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "gockets test"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

func TestTLSServesHTTPSAndWSS(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t)
	addr, _, _ := runDaemon(t, "-tls-cert", certFile, "-tls-key", keyFile)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	t.Cleanup(client.CloseIdleConnections)
	d := &daemon{t: t, url: "https://" + addr}

	status, _, body := d.request(client, "POST", "/channel/prepare", "", func(*http.Request) {})
	var ch channelJSON
	if status != 200 || json.Unmarshal([]byte(body), &ch) != nil {
		t.Fatalf("prepare over https: %d %s", status, body)
	}
	cfg, _ := websocket.NewConfig("wss://"+addr+"/channel/subscribe/"+ch.SubscriberToken, "https://localhost")
	cfg.TlsConfig = &tls.Config{RootCAs: pool}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatalf("subscribe over wss: %v", err)
	}
	defer ws.Close()
	if status, _, body := d.request(client, "POST", "/channel/publish/"+ch.PublisherToken, "secret news", func(*http.Request) {}); status != 200 {
		t.Fatalf("publish over https: %d %s", status, body)
	}
	if got := receive(t, ws); got != "secret news" {
		t.Errorf("received %q over wss", got)
	}
	if resp, err := http.Get("http://" + addr + "/channel"); err == nil {
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("plain http on the TLS port: %s, want 400", resp.Status)
		}
	}

	err = run(context.Background(), []string{"-bind", "127.0.0.1", "-port", "0", "-tls-cert", certFile}, func(string) string { return "" }, io.Discard, io.Discard)
	if err == nil || exitStatus(err) != 2 {
		t.Errorf("-tls-cert without -tls-key: %v", err)
	}
	err = run(context.Background(), []string{"-bind", "127.0.0.1", "-port", "0", "-tls-cert", keyFile, "-tls-key", keyFile}, func(string) string { return "" }, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "load TLS certificate") {
		t.Errorf("a key as certificate: %v", err)
	}
}

func TestTokensNeverReachTheLogs(t *testing.T) {
	const adminToken, hookSecret = "ADMIN-TOKEN-VALUE", "HOOK-SECRET-VALUE"
	hook := startHook(t, func(*http.Request) int { return http.StatusInternalServerError })
	d := startDaemonWith(t, func(c *config) {
		c.hook = hookPolicy{timeout: time.Second, attempts: 2, backoffMin: time.Millisecond, backoffMax: time.Millisecond}
	}, "-log-level", "3", "-admin-token", adminToken, "-hook-secret", hookSecret)
	auth := func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+adminToken) }
	_, _, body := d.request(http.DefaultClient, "POST", "/channel/prepare", fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url), auth)
	var ch channelJSON
	json.Unmarshal([]byte(body), &ch)
	d.request(http.DefaultClient, "PATCH", "/channel/edit/"+ch.PublisherToken, `{"tag": "x"}`, auth)
	d.request(http.DefaultClient, "GET", "/channel/"+ch.PublisherToken, "", func(*http.Request) {}) // 401
	c := d.dial(ch.SubscriberToken)
	d.request(http.DefaultClient, "POST", "/channel/publish/"+ch.PublisherToken, "m", auth)
	c.expectText("m")
	c.send(true, websocket.TextFrame, []byte("to a failing hook"))
	waitFor(t, "the hook failure", func() bool { return d.hub.stats.hookFailed.Load() == 1 })
	c.sendFrame(true, websocket.TextFrame, []byte("unmasked"), false)
	c.expectClose(closeProtocolError)
	d.request(http.DefaultClient, "DELETE", "/channel/publish/"+ch.PublisherToken, "", auth)
	dialWS(t, d.wsURL(ch.SubscriberToken), nil) // 404 now

	logs := d.logs.String()
	for _, secret := range []string{ch.PublisherToken, ch.SubscriberToken, adminToken, hookSecret} {
		if strings.Contains(logs, secret) {
			t.Errorf("%q reached the log:\n%s", secret, logs)
		}
	}
	if !strings.Contains(logs, "channel="+fingerprint(ch.SubscriberToken)) {
		t.Errorf("the channel's fingerprint is not in the log:\n%s", logs)
	}
}

// ---- Configuration from the environment ----

func TestFlagsComeFromTheEnvironmentToo(t *testing.T) {
	env := map[string]string{
		"GOCKETS_PING_INTERVAL": "7",
		"GOCKETS_HOST_NAME":     "from-env",
		"GOCKETS_ADMIN_TOKEN":   "env-token",
		"GOCKETS_BACKLOG_TTL":   "3s",
		"GOCKETS_ADMIN_ALLOW":   "10.0.0.0/8",
	}
	env["GOCKETS_VERSION"] = "1.2.3" // a deploy's version, not -version
	getenv := func(k string) string { return env[k] }
	cfg, err := parseConfig([]string{"-host-name", "from-flag"}, getenv, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.pingInterval != 7*time.Second || cfg.hostName != "from-flag" || cfg.adminToken != "env-token" ||
		cfg.backlogTTL != 3*time.Second || cfg.adminAllow.String() != "10.0.0.0/8" {
		t.Errorf("config %+v", cfg)
	}

	for _, tc := range []struct{ name, value, want string }{
		{"GOCKETS_PORT", "99999", "GOCKETS_PORT 99999 is out of range"},
		{"GOCKETS_PING_INTERVAL", "soon", `GOCKETS_PING_INTERVAL="soon": parse error`},
		{"GOCKETS_ADMIN_ALLOW", "10.0.0.0/33", `GOCKETS_ADMIN_ALLOW="10.0.0.0/33"`},
		{"GOCKETS_HOST_NAME", " ", "GOCKETS_HOST_NAME must not be empty"},
	} {
		err := run(context.Background(), nil, func(k string) string { return map[string]string{tc.name: tc.value}[k] }, io.Discard, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) || exitStatus(err) != 2 {
			t.Errorf("%s=%q: %v, want exit 2 and %q", tc.name, tc.value, err, tc.want)
		}
	}
}

func TestBooleansTakeYesNoOnOff(t *testing.T) {
	for _, tc := range []struct {
		value string
		want  bool
	}{
		{"true", true}, {"1", true}, {"t", true}, {"TRUE", true}, {"yes", true}, {"Yes", true}, {"y", true}, {"on", true}, {"ON", true},
		{"false", false}, {"0", false}, {"f", false}, {"no", false}, {"NO", false}, {"n", false}, {"off", false}, {"Off", false},
	} {
		t.Run(tc.value, func(t *testing.T) {
			env := func(k string) string { return map[string]string{"GOCKETS_HOOK_EVENTS": tc.value}[k] }
			if cfg, err := parseConfig(nil, env, io.Discard); err != nil || cfg.hookEvents != tc.want {
				t.Errorf("GOCKETS_HOOK_EVENTS=%s: hookEvents %v, %v; want %v", tc.value, cfg.hookEvents, err, tc.want)
			}
			none := func(string) string { return "" }
			if cfg, err := parseConfig([]string{"-hook-events=" + tc.value}, none, io.Discard); err != nil || cfg.hookEvents != tc.want {
				t.Errorf("-hook-events=%s: hookEvents %v, %v; want %v", tc.value, cfg.hookEvents, err, tc.want)
			}
		})
	}
	if cfg, err := parseConfig([]string{"-hook-events"}, func(string) string { return "" }, io.Discard); err != nil || !cfg.hookEvents {
		t.Errorf("-hook-events alone: %v, %v", cfg.hookEvents, err)
	}
	err := run(context.Background(), nil, func(k string) string { return map[string]string{"GOCKETS_HOOK_EVENTS": "maybe"}[k] }, io.Discard, io.Discard)
	if want := `GOCKETS_HOOK_EVENTS="maybe": not a boolean: use true or false, yes or no, on or off, 1 or 0`; err == nil || err.Error() != want || exitStatus(err) != 2 {
		t.Errorf("GOCKETS_HOOK_EVENTS=maybe: %v, want exit 2 and %q", err, want)
	}
}

func TestVersion(t *testing.T) {
	var stdout bytes.Buffer
	if err := run(context.Background(), []string{"-version"}, func(string) string { return "" }, &stdout, io.Discard); err != nil {
		t.Fatal(err)
	}
	if stdout.String() != "gockets "+version+"\n" {
		t.Errorf("-version printed %q", stdout.String())
	}
}

// ---- Operators: metrics and health ----

// scrape reads /metrics and checks the text exposition format strictly:
// every sample belongs to a family announced by HELP then TYPE, names and
// labels are well formed, values are integers, counters end in _total.
func scrape(t *testing.T, d *daemon) map[string]int64 {
	t.Helper()
	status, header, body := d.call("GET", "/metrics", "")
	if status != 200 || header.Get("Content-Type") != "text/plain; version=0.0.4; charset=utf-8" {
		t.Fatalf("GET /metrics: %d %q", status, header.Get("Content-Type"))
	}
	name := regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`)
	sampleLine := regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-z_]+="[^"\\]*"(,[a-z_]+="[^"\\]*")*\})? (-?[0-9]+)$`)
	samples := map[string]int64{}
	var family, kind string
	var helped bool
	for n, line := range strings.Split(strings.TrimSuffix(body, "\n"), "\n") {
		switch f := strings.Fields(line); {
		case strings.HasPrefix(line, "# HELP "):
			if len(f) < 4 || !name.MatchString(f[2]) {
				t.Fatalf("line %d: bad HELP %q", n+1, line)
			}
			family, kind, helped = f[2], "", true
		case strings.HasPrefix(line, "# TYPE "):
			if len(f) != 4 || f[2] != family || !helped || f[3] != "counter" && f[3] != "gauge" {
				t.Fatalf("line %d: TYPE %q does not follow the HELP of %q", n+1, line, family)
			}
			kind = f[3]
			if kind == "counter" != strings.HasSuffix(family, "_total") {
				t.Errorf("line %d: %s %s: counters, and only they, end in _total", n+1, kind, family)
			}
		default:
			m := sampleLine.FindStringSubmatch(line)
			if m == nil || m[1] != family || kind == "" {
				t.Fatalf("line %d: %q is not a sample of %q", n+1, line, family)
			}
			v, _ := strconv.ParseInt(m[4], 10, 64)
			if _, dup := samples[m[1]+m[2]]; dup {
				t.Fatalf("line %d: %s%s twice", n+1, m[1], m[2])
			}
			samples[m[1]+m[2]] = v
		}
	}
	return samples
}

func TestMetricsAreExactAndMove(t *testing.T) {
	hook := startHook(t, nil)
	d := startDaemon(t)
	before := scrape(t, d)
	for _, want := range []string{
		"gockets_channels", `gockets_subscribers{transport="websocket"}`, `gockets_subscribers{transport="sse"}`,
		"gockets_messages_published_total", "gockets_messages_delivered_total", "gockets_messages_queued_total",
		`gockets_messages_dropped_total{reason="backlog_full"}`, `gockets_messages_dropped_total{reason="backlog_expired"}`,
		`gockets_messages_dropped_total{reason="no_subscriber"}`, `gockets_messages_dropped_total{reason="slow_subscriber"}`,
		`gockets_messages_dropped_total{reason="subscriber_gone"}`,
		`gockets_hook_requests_total{result="ok"}`, `gockets_hook_requests_total{result="error"}`,
		`gockets_hook_dropped_total{reason="queue_full"}`, `gockets_hook_dropped_total{reason="no_hook"}`, `gockets_hook_dropped_total{reason="attempts_spent"}`,
		"gockets_slow_subscriber_disconnects_total", "gockets_state_save_failures_total",
		`gockets_hook_dropped_total{reason="total_queue_full"}`, "gockets_hook_queued", "gockets_hook_queued_bytes",
		"gockets_hook_queue_limit", "gockets_hook_queue_limit_bytes", "gockets_hook_posts_in_flight",
		`gockets_hook_posts_limit{per="daemon"}`, `gockets_hook_posts_limit{per="host"}`,
		`gockets_subscribers_limit{per="daemon"}`, `gockets_subscribers_limit{per="channel"}`,
		`gockets_subscribers_refused_total{reason="channel_full"}`, `gockets_subscribers_refused_total{reason="daemon_full"}`,
		"go_goroutines", "go_memstats_heap_alloc_bytes", `gockets_build_info{version="` + version + `"}`,
	} {
		if _, ok := before[want]; !ok {
			t.Errorf("no sample %s", want)
		}
	}

	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))
	d.publish(ch.PublisherToken, "kept")
	ws := d.subscribe(ch.SubscriberToken)
	events := d.sse(ch.SubscriberToken, "")
	receive(t, ws)
	d.publish(ch.PublisherToken, "live")
	receive(t, ws)
	events.next()
	if err := websocket.Message.Send(ws, "to the hook"); err != nil {
		t.Fatal(err)
	}
	recv(t, hook.requests, "hook")
	waitFor(t, "the hook delivery to be counted", func() bool { return d.hub.stats.hookDelivered.Load() == 1 })

	after := scrape(t, d)
	for name, delta := range map[string]int64{
		"gockets_channels":                           1,
		`gockets_subscribers{transport="websocket"}`: 1,
		`gockets_subscribers{transport="sse"}`:       1,
		"gockets_messages_published_total":           2,
		"gockets_messages_delivered_total":           3, // kept + live to the WebSocket, live to SSE
		"gockets_messages_queued_total":              1,
		`gockets_hook_requests_total{result="ok"}`:   1,
	} {
		if got := after[name] - before[name]; got != delta {
			t.Errorf("%s moved by %d, want %d", name, got, delta)
		}
	}
	if after["go_goroutines"] <= 0 || after["go_memstats_heap_alloc_bytes"] <= 0 {
		t.Errorf("runtime gauges: %d goroutines, %d heap bytes", after["go_goroutines"], after["go_memstats_heap_alloc_bytes"])
	}
}

func TestHealthz(t *testing.T) {
	d := startDaemon(t, "-admin-token", "t", "-admin-allow", "10.0.0.0/8")
	status, header, body := d.callHost("any.host.example", "GET", "/healthz", "")
	if status != 200 || body != `{"type":"OK","message":"serving"}`+"\n" || header.Get("Content-Type") != "application/json" {
		t.Errorf("healthz while serving: %d %s", status, body)
	}
	d.hub.closeAll() // shutdown begins
	if status, _, body := d.call("GET", "/healthz", ""); status != 503 || body != `{"type":"ERR","message":"shutting down"}`+"\n" {
		t.Errorf("healthz during shutdown: %d %s", status, body)
	}
}

// ---- Server-Sent Events ----

type sseClient struct {
	t    testing.TB
	conn net.Conn
	resp *http.Response
	br   *bufio.Reader
}

type sseEvent struct{ id, event, data, comment string }

// sse opens an event stream on a raw connection, so that reads can have
// deadlines; lastID, when not empty, is sent as Last-Event-ID.
func (d *daemon) sse(token, lastID string) *sseClient {
	d.t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(d.url, "http://"))
	if err != nil {
		d.t.Fatal(err)
	}
	d.t.Cleanup(func() { conn.Close() })
	req, _ := http.NewRequest("GET", d.url+"/channel/subscribe/"+token, nil)
	req.Header.Set("Accept", "text/event-stream")
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	if err := req.Write(conn); err != nil {
		d.t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(waitTimeout))
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		d.t.Fatal(err)
	}
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		d.t.Fatalf("event stream: %s %q", resp.Status, resp.Header.Get("Content-Type"))
	}
	return &sseClient{t: d.t, conn: conn, resp: resp, br: bufio.NewReader(resp.Body)}
}

// next returns the next event, comments included.
func (c *sseClient) next() sseEvent {
	c.t.Helper()
	c.conn.SetReadDeadline(time.Now().Add(waitTimeout))
	var ev sseEvent
	var data []string
	for {
		line, err := c.br.ReadString('\n')
		if err != nil {
			c.t.Fatalf("read event: %v", err)
		}
		line = strings.TrimSuffix(line, "\n")
		switch field, value, _ := strings.Cut(line, ": "); {
		case line == "":
			ev.data = strings.Join(data, "\n")
			return ev
		case strings.HasPrefix(line, ":"):
			ev.comment = strings.TrimSpace(line[1:])
		case field == "id":
			ev.id = value
		case field == "event":
			ev.event = value
		case field == "data":
			data = append(data, value)
		default:
			c.t.Fatalf("unexpected line %q", line)
		}
	}
}

// message returns the next event that is not a comment.
func (c *sseClient) message() sseEvent {
	c.t.Helper()
	for {
		if ev := c.next(); ev.comment == "" {
			return ev
		}
	}
}

// TestSSEPingsAtMostEvery30s: an SSE stream gets its ": ping" comment
// every -ping-interval, but at least every 30 s (proxies close a silent
// response after 60 s by default); a WebSocket gets its ping every
// -ping-interval, however long.
func TestSSEPingsAtMostEvery30s(t *testing.T) {
	for _, tc := range []struct {
		pingInterval, transport string
		want                    time.Duration
	}{
		{"60", "sse", 30 * time.Second},
		{"60", "websocket", time.Minute},
		{"10", "sse", 10 * time.Second},
		{"300", "sse", 30 * time.Second},
		{"300", "websocket", 5 * time.Minute},
	} {
		h := newTestHub(t, "-ping-interval", tc.pingInterval)
		ch, _ := h.prepare(channelOptions{})
		if got := h.newSubscriber(ch, tc.transport).pingInterval(); got != tc.want {
			t.Errorf("-ping-interval %s (seconds), %s: pings every %v, want %v", tc.pingInterval, tc.transport, got, tc.want)
		}
	}
}

func TestSSEStreamsMessagesWithIDs(t *testing.T) {
	d := startDaemonWith(t, func(c *config) { c.pingInterval = 50 * time.Millisecond }, "-read-timeout", "100ms", "-write-timeout", "100ms")
	ch := d.prepare("")
	c := d.sse(ch.SubscriberToken, "")
	if c.resp.Header.Get("Cache-Control") != "no-cache" || c.resp.Header.Get("X-Accel-Buffering") != "no" {
		t.Errorf("headers %v", c.resp.Header)
	}
	if n := d.listeners(ch.PublisherToken); n != 1 {
		t.Errorf("listeners = %d with an SSE subscriber, want 1", n)
	}
	if ev := c.next(); ev.comment != "ping" {
		t.Errorf("first event %+v, want the heartbeat comment", ev)
	}
	for i := range 3 { // 150 ms of heartbeats: past both server timeouts
		if ev := c.next(); ev.comment != "ping" {
			t.Fatalf("heartbeat %d: %+v", i, ev)
		}
	}
	d.publish(ch.PublisherToken, "one")
	d.publish(ch.PublisherToken, "two\nlines\r\nand\rbreaks")
	req := func(r *http.Request) { r.Header.Set("Content-Type", "application/octet-stream") }
	d.request(http.DefaultClient, "POST", "/channel/publish/"+ch.PublisherToken, "\x00\xffbin", req)
	first, second, third := c.message(), c.message(), c.message()
	if first.data != "one" || second.data != "two\nlines\nand\nbreaks" || third.event != "binary" || third.data != base64.StdEncoding.EncodeToString([]byte("\x00\xffbin")) {
		t.Errorf("events %+v %+v %+v", first, second, third)
	}
	a, _ := strconv.ParseUint(first.id, 10, 64)
	b, _ := strconv.ParseUint(second.id, 10, 64)
	if a == 0 || b != a+1 {
		t.Errorf("ids %q, %q: want increasing by one", first.id, second.id)
	}

	d.mustCall("DELETE", "/channel/publish/"+ch.PublisherToken, "", 200, nil)
	if ev := c.message(); ev.event != "close" || ev.data != `{"code":1000,"reason":"channel deleted"}` {
		t.Errorf("last event %+v", ev)
	}
	if _, err := c.br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Errorf("stream not ended: %v", err)
	}
}

func TestSSEResumesFromLastEventID(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	other := d.subscribe(ch.SubscriberToken) // so that messages are delivered, not queued
	c := d.sse(ch.SubscriberToken, "")
	d.publish(ch.PublisherToken, "seen")
	seen := c.message()
	receive(t, other)
	c.conn.Close()
	waitFor(t, "the SSE subscriber to leave", func() bool { return d.listeners(ch.PublisherToken) == 1 })

	for _, m := range []string{"missed 1", "missed 2"} {
		if r := d.publish(ch.PublisherToken, m); r.Subscribers != 1 {
			t.Fatalf("publish %q: %+v", m, r)
		}
		receive(t, other)
	}
	resumed := d.sse(ch.SubscriberToken, seen.id)
	for _, want := range []string{"missed 1", "missed 2"} {
		if ev := resumed.message(); ev.data != want {
			t.Fatalf("resumed with %+v, want %q", ev, want)
		}
	}
	d.publish(ch.PublisherToken, "live")
	if ev := resumed.message(); ev.data != "live" {
		t.Errorf("after resuming: %+v, want live (nothing twice)", ev)
	}
}

func TestSubscribeAsksForWebSocketOrSSE(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	status, _, body := d.call("GET", "/channel/subscribe/"+ch.SubscriberToken, "")
	if status != 400 || body != `{"type":"ERR","message":"expected a WebSocket upgrade, or Accept: text/event-stream"}`+"\n" {
		t.Errorf("neither: %d %s", status, body)
	}
}

// TestSSEHoldsNoCopyOfAMessage publishes a message to 200 event streams:
// no subscriber may keep a buffer of its size afterwards, nor make a copy
// of it to send it. 256 KiB, not the issue's 1 MB: under -race on a busy
// machine, 200 MB through 200 streams can outlast the daemon's 10 s write
// deadline. With 1 MiB, 200 subscribers kept 222 MB (text) and 280 MB
// (binary) before, and made 5.2 and 2.8 MB of garbage per delivery.
func TestSSEHoldsNoCopyOfAMessage(t *testing.T) {
	const subscribers, size = 200, 256 << 10
	line := strings.Repeat("x", 8<<10-1) + "\n" // each line is a data line of its own
	text := strings.Repeat(line, size/len(line))
	binary := strings.Repeat("\x00\xff", size/2)
	for _, tc := range []struct {
		name, contentType, body, event string
	}{
		{"text", "text/plain", text, "data: " + strings.ReplaceAll(text, "\n", "\ndata: ") + "\n\n"},
		{"binary", "application/octet-stream", binary, "event: binary\ndata: " + base64.StdEncoding.EncodeToString([]byte(binary)) + "\n\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t)
			ch := d.prepare("")
			clients := make([]*sseClient, subscribers)
			for i := range clients {
				clients[i] = d.sse(ch.SubscriberToken, "")
			}
			received := make(chan error, subscribers)
			bufs := make([][32 << 10]byte, subscribers)
			base := liveBytes()
			var before runtime.MemStats
			runtime.ReadMemStats(&before)
			d.request(http.DefaultClient, "POST", "/channel/publish/"+ch.PublisherToken, tc.body, func(r *http.Request) {
				r.Header.Set("Content-Type", tc.contentType)
			})
			for i, c := range clients {
				go func() { received <- c.expectEvent(tc.event, bufs[i][:]) }()
			}
			for range clients {
				if err := recv(t, received, "the event"); err != nil {
					t.Fatal(err)
				}
			}
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			live := int64(liveBytes()) - int64(base)
			runtime.KeepAlive(bufs) // counted in base
			perDelivery := (after.TotalAlloc - before.TotalAlloc) / subscribers
			t.Logf("%s, %d B to %d subscribers: %d KB more live after, %d B allocated per delivery", tc.name, len(tc.body), subscribers, live/1000, perDelivery)
			if live > 5e6 {
				t.Errorf("%d MB more live after the publish, want < 5 MB", live/1e6)
			}
			if perDelivery > size/4 { // a copy is as big as the message, or bigger
				t.Errorf("%d KB allocated per delivery, want < %d KB", perDelivery/1000, size/4/1000)
			}
		})
	}
}

// expectEvent reads the next event, which must be "id: N\n" and then
// exactly rest, comparing as it reads through buf: it keeps no copy.
func (c *sseClient) expectEvent(rest string, buf []byte) error {
	c.conn.SetReadDeadline(time.Now().Add(waitTimeout))
	id, err := c.br.ReadSlice('\n')
	if _, badID := strconv.ParseUint(string(bytes.TrimSuffix(bytes.TrimPrefix(id, []byte("id: ")), []byte("\n"))), 10, 64); err != nil || badID != nil {
		return fmt.Errorf("event begins with %q (%v), want its id", id, err)
	}
	for read := 0; read < len(rest); {
		c.conn.SetReadDeadline(time.Now().Add(waitTimeout)) // for each piece: 200 streams share the CPU
		n, err := c.br.Read(buf[:min(len(buf), len(rest)-read)])
		if string(buf[:n]) != rest[read:read+n] {
			return fmt.Errorf("event differs from byte %d on", read)
		}
		read += n
		if err != nil && read < len(rest) {
			return fmt.Errorf("event ended at byte %d of %d: %v", read, len(rest), err)
		}
	}
	return nil
}

// TestHeadIsNoSubscriber asks for an event stream with HEAD: the answer has
// the stream's headers and no body, so it neither takes the backlog nor
// counts as a listener.
func TestHeadIsNoSubscriber(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	d.publish(ch.PublisherToken, "kept")
	// On a connection of its own: a HEAD served as a stream never ends.
	status, header, body := d.request(&http.Client{Timeout: waitTimeout}, "HEAD", "/channel/subscribe/"+ch.SubscriberToken, "", func(r *http.Request) {
		r.Header.Set("Accept", "text/event-stream")
		r.Close = true
	})
	if status != 200 || header.Get("Content-Type") != "text/event-stream" || body != "" {
		t.Errorf("HEAD: %d %q %q", status, header.Get("Content-Type"), body)
	}
	m := scrape(t, d)
	for _, name := range []string{
		`gockets_subscribers{transport="sse"}`, "gockets_messages_delivered_total", `gockets_messages_dropped_total{reason="subscriber_gone"}`,
	} {
		if m[name] != 0 {
			t.Errorf("%s = %d after HEAD, want 0", name, m[name])
		}
	}
	if n := d.listeners(ch.PublisherToken); n != 0 {
		t.Errorf("listeners = %d after HEAD, want 0", n)
	}
	if ev := d.sse(ch.SubscriberToken, "").message(); ev.data != "kept" {
		t.Errorf("the first real subscriber got %+v, want the kept message", ev)
	}
}

// ---- Binary messages ----

func TestBinaryMessagesBothWays(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	c := d.dial(ch.SubscriberToken)
	binaryBody := "\x00\x01\xfe\xff"
	for _, ct := range []string{"application/octet-stream", "Application/Octet-Stream; x=y"} {
		status, _, body := d.request(http.DefaultClient, "POST", "/channel/publish/"+ch.PublisherToken, binaryBody,
			func(r *http.Request) { r.Header.Set("Content-Type", ct) })
		if status != 200 {
			t.Fatalf("binary publish: %d %s", status, body)
		}
		if op, p := c.next(); op != websocket.BinaryFrame || string(p) != binaryBody {
			t.Errorf("got frame %d %q, want binary %q", op, p, binaryBody)
		}
	}
	d.publish(ch.PublisherToken, "text")
	c.expectText("text")
	var got struct{ Type, Message string }
	d.mustCall("POST", "/channel/publish/"+ch.PublisherToken, binaryBody, 400, &got)
	if !strings.Contains(got.Message, "not UTF-8") {
		t.Errorf("non-UTF-8 text: %+v", got)
	}
}

// ---- Presence events ----

func TestPresenceEventsOncePerChange(t *testing.T) {
	hook := startHook(t, nil)
	d := startDaemon(t, "-hook-events")
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))
	event := func(want string, listeners int, code int) {
		t.Helper()
		r := recv(t, hook.requests, want+" event")
		var e presenceEvent
		if err := json.Unmarshal([]byte(r.body), &e); err != nil || r.header.Get("X-Gockets-Event") != want ||
			r.header.Get("Content-Type") != "application/json" || e.Event != want || e.Channel != ch.SubscriberToken ||
			e.Listeners != listeners || e.Code != code {
			t.Fatalf("got %s %q, want %s with %d listeners, code %d", r.header.Get("X-Gockets-Event"), r.body, want, listeners, code)
		}
	}

	a := d.dial(ch.SubscriberToken)
	event("connect", 1, 0)
	a.send(true, websocket.TextFrame, []byte("a message"))
	if r := recv(t, hook.requests, "message"); r.body != "a message" || r.header.Get("X-Gockets-Event") != "" {
		t.Fatalf("message reached the hook as %q with X-Gockets-Event %q", r.body, r.header.Get("X-Gockets-Event"))
	}
	a.send(true, websocket.CloseFrame, closePayload(closeNormal))
	a.expectClose(closeNormal)
	event("disconnect", 0, closeNormal) // a client close

	b := d.dial(ch.SubscriberToken)
	event("connect", 1, 0)
	b.conn.Close()
	event("disconnect", 0, closeGoingAway) // a dropped connection

	c := d.dial(ch.SubscriberToken)
	event("connect", 1, 0)
	d.mustCall("DELETE", "/channel/publish/"+ch.PublisherToken, "", 200, nil)
	c.expectClose(closeNormal)
	event("disconnect", 0, closeNormal) // the channel deleted

	d.stop() // waits for queued hook requests
	if n := len(hook.requests); n != 0 {
		t.Errorf("%d more requests reached the hook, want none", n)
	}
}

// TestDroppedHookItemsAreNamed: a drop says whether it was a message or a
// presence event.
func TestDroppedHookItemsAreNamed(t *testing.T) {
	hook := startHook(t, func(*http.Request) int { return http.StatusBadRequest }) // not retried
	d := startDaemon(t, "-hook-events")
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))
	c := d.dial(ch.SubscriberToken)
	c.send(true, websocket.TextFrame, []byte("a message"))
	c.send(true, websocket.CloseFrame, closePayload(closeNormal))
	c.expectClose(closeNormal)
	waitFor(t, "three failed deliveries", func() bool { return d.hub.stats.hookFailed.Load() == 3 })
	logs := d.logs.String()
	for _, what := range []string{"connect event", "message", "disconnect event"} {
		if line := `level=WARN msg="hook delivery failed: ` + what + ` dropped"`; strings.Count(logs, line) != 1 {
			t.Errorf("not once in the log: %s\n%s", line, logs)
		}
	}
}

// ---- Benchmarks ----
//
//	go test -run '^$' -bench . -benchmem .

// BenchmarkFanout publishes over HTTP to 1, 100 and 1,000 WebSocket
// subscribers on loopback, each reading every message: the whole path, with
// the syscalls. ns/op is per published message.
func BenchmarkFanout(b *testing.B) {
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			d := startDaemonWith(b, func(c *config) { c.sendQueue = 1 << 20 }, "-log-level", "2", "-backlog", "0")
			ch := d.prepare("")
			var wg sync.WaitGroup
			for range n {
				c := d.dial(ch.SubscriberToken)
				wg.Go(func() {
					for range b.N {
						if op, _ := c.next(); op != websocket.TextFrame {
							b.Errorf("frame %d", op)
							return
						}
					}
				})
			}
			body := strings.Repeat("x", 64)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				d.publish(ch.PublisherToken, body)
			}
			wg.Wait()
			b.ReportMetric(float64(n)*float64(b.N)/b.Elapsed().Seconds(), "deliveries/s")
		})
	}
}

// discardPeer is a subscriber's far end that takes everything at once, so
// that a benchmark measures the daemon and not the network.
type discardPeer struct{}

func (discardPeer) send(*message) error                { return nil }
func (discardPeer) flush() error                       { return nil }
func (discardPeer) ping() error                        { return nil }
func (discardPeer) pong([]byte) error                  { return nil }
func (discardPeer) goodbye(farewell) error             { return nil }
func (discardPeer) setWriteDeadline(t time.Time) error { return nil }
func (discardPeer) setReadDeadline(t time.Time) error  { return nil }

// textMessage is a message as handlePublish makes it.
func textMessage(data []byte) *message {
	buf := make([]byte, frameHeadroom+len(data))
	copy(buf[frameHeadroom:], data)
	return newMessage(buf, false, time.Now())
}

// BenchmarkPublish is the hub's side of a publish to 0, 1, 100 and 1,000
// subscribers whose writers run for real but write nowhere: one message is
// allocated per publish and shared, so allocs/op stays flat as subscribers
// grow. It ends when every writer has written every message.
func BenchmarkPublish(b *testing.B) {
	for _, n := range []int{0, 1, 100, 1000} {
		b.Run(fmt.Sprintf("subscribers=%d", n), func(b *testing.B) {
			cfg, _ := parseConfig([]string{"-backlog", "0"}, func(string) string { return "" }, io.Discard)
			cfg.sendQueue = 1 << 30
			h, _ := newHub(cfg, newLogger(io.Discard, 2))
			ch, _ := h.prepare(channelOptions{})
			for range n {
				s := h.newSubscriber(ch, "websocket")
				h.join(ch, s, false, 0)
				s.begin(discardPeer{}, nil)
			}
			body := make([]byte, frameHeadroom+64) // as readBodyAfter reads it
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				h.publish(ch, newMessage(body, false, time.Now()), nil)
			}
			for h.stats.delivered.Load() < int64(n*b.N) {
				runtime.Gosched()
			}
			b.StopTimer()
			h.closeAll()
		})
	}
}

// BenchmarkWebSocketFrame is what one 64-byte message costs to write to a
// socket (read by a raw reader that allocates nothing), one write each:
// through x/net/websocket's frame writer, which allocates and builds the
// frame for every write, and as the daemon does, the frame built once per
// message (newMessage) and written by a subscriber's frameBatch.
func BenchmarkWebSocketFrame(b *testing.B) {
	data := []byte(strings.Repeat("x", 64))
	b.Run("x/net", func(b *testing.B) {
		server := make(chan *websocket.Conn, 1)
		done := make(chan struct{})
		srv := httptest.NewServer(websocket.Server{Handler: func(ws *websocket.Conn) {
			server <- ws
			<-done
		}})
		b.Cleanup(func() { close(done); srv.Close() })
		c, _ := dialWS(b, "ws"+strings.TrimPrefix(srv.URL, "http"), nil)
		go io.Copy(io.Discard, c.br)
		ws := <-server
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			w, err := ws.NewFrameWriter(websocket.TextFrame)
			if err == nil {
				_, err = w.Write(data)
			}
			if err != nil || w.Close() != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoded-once", func(b *testing.B) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		go func() {
			if c, err := ln.Accept(); err == nil {
				io.Copy(io.Discard, c)
			}
		}()
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		raw, _ := conn.(*net.TCPConn).SyscallConn()
		pool := &sync.Pool{New: func() any { return new([]byte) }}
		noDeadline := func() error { return nil }
		out := &frameBatch{conn: conn, fd: -1, pool: pool, arm: noDeadline, disarm: noDeadline}
		if err := raw.Control(func(fd uintptr) { out.fd = int(fd) }); err != nil {
			b.Fatal(err)
		}
		m := textMessage(data)
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			if err := (wsPeer{out: out}).send(m); err != nil {
				b.Fatal(err)
			}
			if err := out.end(true); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func TestSubscriberConnectionHasTheCappedSendBuffer(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	d.dial(ch.SubscriberToken)
	var out *frameBatch
	waitFor(t, "the subscriber to start", func() bool {
		c := d.hub.bySubscriberToken(ch.SubscriberToken)
		c.mu.Lock()
		defer c.mu.Unlock()
		if len(c.subscribers) == 0 {
			return false
		}
		s := c.subscribers[0]
		s.mu.Lock()
		defer s.mu.Unlock()
		out = s.out
		return out != nil
	})
	size, err := syscall.GetsockoptInt(out.fd, syscall.SOL_SOCKET, syscall.SO_SNDBUF)
	if err != nil {
		t.Fatalf("get send buffer: %v", err)
	}
	if size != 2*sendBufferBytes { // Linux doubles what was set, for its bookkeeping
		t.Errorf("send buffer of a subscriber's connection: %d bytes, want %d", size, 2*sendBufferBytes)
	}
}

// BenchmarkConnect is one WebSocket subscriber connecting over loopback:
// accept, the upgrade request, the 101, the subscriber's start. The client
// writes a fixed request and reads the answer into a fixed buffer, so that
// what is allocated is the daemon's. Subscribers stay connected, as idle
// ones do, and are closed in rounds outside the timer. cpu-ns/op is the
// process's CPU time (the daemon's and the client's) per connect, less
// sensitive to a busy machine than the time.
func BenchmarkConnect(b *testing.B) {
	d := startDaemon(b, "-log-level", "2")
	ch := d.prepare("")
	u, err := url.Parse(d.url)
	if err != nil {
		b.Fatal(err)
	}
	request := []byte("GET /channel/subscribe/" + ch.SubscriberToken + " HTTP/1.1\r\nHost: " + u.Host +
		"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
	const round = 1000
	conns := make([]net.Conn, 0, round)
	closeAll := func() {
		for _, c := range conns {
			c.Close()
		}
		conns = conns[:0]
		deadline := time.Now().Add(waitTimeout)
		for d.hub.connected.Load() != 0 && time.Now().Before(deadline) {
			runtime.Gosched()
		}
	}
	var answer [256]byte
	cpu, paused := processCPU(b), time.Duration(0)
	b.ReportAllocs()
	for b.Loop() {
		c, err := net.Dial("tcp", u.Host)
		if err != nil {
			b.Fatal(err)
		}
		conns = append(conns, c)
		if _, err := c.Write(request); err != nil {
			b.Fatal(err)
		}
		n := 0
		for !bytes.HasSuffix(answer[:n], []byte("\r\n\r\n")) {
			m, err := c.Read(answer[n:])
			if err != nil {
				b.Fatalf("read the answer: %v (%q)", err, answer[:n])
			}
			n += m
		}
		if !bytes.HasPrefix(answer[:n], []byte("HTTP/1.1 101 ")) {
			b.Fatalf("answer %q", answer[:n])
		}
		if len(conns) == round {
			b.StopTimer()
			start := processCPU(b)
			closeAll()
			paused += processCPU(b) - start
			b.StartTimer()
		}
	}
	b.ReportMetric(float64(processCPU(b)-cpu-paused)/float64(b.N), "cpu-ns/op")
	b.StopTimer()
	closeAll()
}

// processCPU is the CPU time this process has used, user and system.
func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkPrepare is POST /channel/prepare through the router, the admin
// check and the JSON reply (the request itself is built in the loop).
func BenchmarkPrepare(b *testing.B) {
	h := newTestHub(b)
	body := `{"subscriber_message_hook_url": "http://localhost/hook.php", "tag": "user-42"}`
	b.ReportAllocs()
	for range b.N {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("POST", "http://localhost/channel/prepare", strings.NewReader(body)))
		if rec.Code != 200 {
			b.Fatal(rec.Code)
		}
	}
}

// BenchmarkPublishNoSubscriber is POST /channel/publish/{token} through the
// router to a channel nobody listens to, the message kept in its backlog.
func BenchmarkPublishNoSubscriber(b *testing.B) {
	h := newTestHub(b)
	ch, _ := h.prepare(channelOptions{})
	target := "http://localhost/channel/publish/" + ch.publisherToken
	body := strings.Repeat("x", 64)
	b.ReportAllocs()
	for range b.N {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("POST", target, strings.NewReader(body)))
		if rec.Code != 200 {
			b.Fatal(rec.Code)
		}
	}
}

func TestRefusedSubscriberMakesNoPresenceEvent(t *testing.T) {
	hook := startHook(t, nil)
	d := startDaemon(t, "-hook-events")
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))
	d.hub.closeAll() // shutdown has begun: joining is refused
	c, resp := dialWS(t, d.wsURL(ch.SubscriberToken), nil)
	if c != nil {
		t.Fatal("subscribed during shutdown")
	}
	if body, _ := io.ReadAll(resp.Body); resp.StatusCode != 503 || string(body) != `{"type":"ERR","message":"shutting down"}`+"\n" {
		t.Errorf("subscribe during shutdown: %s %s", resp.Status, body)
	}
	if err := d.stop(); err != nil { // waits for queued hook requests
		t.Fatal(err)
	}
	if n := len(hook.requests); n != 0 {
		t.Errorf("%d presence events for a subscriber that never joined", n)
	}
}

// ---- Edges found in review ----

func TestSeveralSubprotocolsStillSubscribe(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	for _, tc := range []struct {
		offered string
		chosen  []string // the first offered; none when none is named
	}{
		{"v1, v2", []string{"v1"}},
		{", v2", []string{"v2"}},
		{", ,", nil},
	} {
		t.Run(tc.offered, func(t *testing.T) {
			d := d.in(t)
			d.publish(ch.PublisherToken, "kept")
			c, resp := dialWS(t, d.wsURL(ch.SubscriberToken), http.Header{"Sec-Websocket-Protocol": {tc.offered}})
			if c == nil {
				t.Fatalf("a client offering %q: %s", tc.offered, resp.Status)
			}
			if got := resp.Header["Sec-Websocket-Protocol"]; !slices.Equal(got, tc.chosen) {
				t.Errorf("subprotocol %q, want %q", got, tc.chosen)
			}
			c.expectText("kept")
			c.send(true, websocket.CloseFrame, closePayload(closeNormal))
			c.expectClose(closeNormal)
		})
	}
}

// TestFailedUpgradeGivesTheBacklogBack: what a join took from the backlog
// waits again for the next subscriber when the upgrade fails after the
// join, in order, and reaches it once.
func TestFailedUpgradeGivesTheBacklogBack(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	d.publish(ch.PublisherToken, "kept 1")
	d.publish(ch.PublisherToken, "kept 2")
	c := d.channelOf(ch.SubscriberToken)
	s := d.hub.newSubscriber(c, "websocket")
	if err := d.hub.engine.join(c, s, false, 0); err != nil {
		t.Fatalf("join refused: %v", err)
	}
	d.hub.engine.unjoin(c, s) // what subscribeWebSocket does when x/net's upgrade fails
	if n := d.listeners(ch.PublisherToken); n != 0 {
		t.Fatalf("listeners %d after a failed upgrade", n)
	}
	a := d.dial(ch.SubscriberToken)
	a.expectText("kept 1")
	a.expectText("kept 2")
	b := d.dial(ch.SubscriberToken) // nothing is left for it
	d.publish(ch.PublisherToken, "live")
	a.expectText("live")
	b.expectText("live")
}

// TestFailedHijackReleasesTheSubscriber: x/net panics when the hijack
// fails, and net/http recovers; what admitted the subscriber must be
// released all the same, or the limits fill with subscribers that never
// came. The hub serves the upgrade here into a ResponseWriter that cannot
// hijack, or whose hijack fails; then, with room for one subscriber in all
// and one per channel, a real one connects.
func TestFailedHijackReleasesTheSubscriber(t *testing.T) {
	for _, tc := range []struct {
		name string
		w    func() http.ResponseWriter
	}{
		{"cannot hijack", func() http.ResponseWriter { return httptest.NewRecorder() }},
		{"hijack fails", func() http.ResponseWriter { return failingHijacker{httptest.NewRecorder()} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, "-max-subscribers", "1", "-max-subscribers-per-channel", "1", "-log-level", "2")
			ch := d.prepare("")
			d.publish(ch.PublisherToken, "kept")
			r := httptest.NewRequest("GET", "/channel/subscribe/"+ch.SubscriberToken, nil)
			r.Header.Set("Upgrade", "websocket")
			r.Header.Set("Connection", "Upgrade")
			r.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
			r.Header.Set("Sec-WebSocket-Version", "13")
			var panicked any
			func() {
				defer func() { panicked = recover() }()
				d.hub.ServeHTTP(tc.w(), r)
			}()
			if panicked == nil {
				t.Fatal("x/net did not panic: the hijack did not fail")
			}
			if n := d.hub.connected.Load(); n != 0 {
				t.Errorf("%d subscribers counted after the failed upgrade, want 0", n)
			}
			d.dial(ch.SubscriberToken).expectText("kept")
		})
	}
}

// failingHijacker is a ResponseWriter whose hijack fails.
type failingHijacker struct{ http.ResponseWriter }

func (failingHijacker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return nil, nil, errors.New("the connection went")
}

func TestSlowSubscriberIsCountedOnceUnderConcurrentPublishes(t *testing.T) {
	d := startDaemonWith(t, func(c *config) { c.sendQueue = 1 }, "-log-level", "2")
	ch := d.prepare("")
	c := d.hub.byPublisherToken(ch.PublisherToken)
	stuck := d.hub.newSubscriber(c, "websocket") // no writer: its queue never drains
	d.hub.join(c, stuck, false, 0)
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() { d.hub.publish(c, textMessage([]byte("m")), nil) })
	}
	wg.Wait()
	if n := d.hub.stats.slowDisconnects.Load(); n != 1 {
		t.Errorf("one slow subscriber counted %d times", n)
	}
	if n := d.listeners(ch.PublisherToken); n != 0 {
		t.Errorf("listeners %d", n)
	}
}

func TestShutdownWithAStuckSubscriberIsBounded(t *testing.T) {
	d := startDaemon(t, "-log-level", "2")
	ch := d.prepare("")
	small := &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return errors.Join(err, serr)
	}}
	if c, _ := dialWSWith(t, small, d.wsURL(ch.SubscriberToken), nil); c == nil {
		t.Fatal("not connected")
	}
	big := strings.Repeat("x", 60<<10)
	for range 200 { // 12 MB: far more than the kernel holds for it
		d.publish(ch.PublisherToken, big)
	}
	start := time.Now()
	if err := d.stop(); err != nil {
		t.Fatalf("shutdown: %v (exit status 1)", err)
	}
	if elapsed := time.Since(start); elapsed > shutdownTimeout-time.Second {
		t.Errorf("shutdown took %v", elapsed)
	} else {
		t.Logf("shutdown with a stuck subscriber took %v", elapsed)
	}
}

// TestShutdownNamesWhatItAbandons: a client trickling a request body,
// even one refused with 401 (whose body net/http still reads), costs a
// bounded shutdown, exit status 0 and a warning that names the request;
// hook deliveries cut short fail the shutdown, and it says so, not more.
func TestShutdownNamesWhatItAbandons(t *testing.T) {
	const grace = time.Second
	d := startDaemonWith(t, func(c *config) { c.shutdown = grace }, "-admin-token", "t0ken")
	var ch channelJSON
	status, _, body := d.request(http.DefaultClient, "POST", "/channel/prepare", "", func(r *http.Request) { r.Header.Set("Authorization", "Bearer t0ken") })
	if status != 200 || json.Unmarshal([]byte(body), &ch) != nil {
		t.Fatalf("prepare: %d %s", status, body)
	}
	trickle := func(request string) {
		conn, err := net.Dial("tcp", strings.TrimPrefix(d.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		fmt.Fprint(conn, request)
		go func() { // a byte now and then, never the whole body
			for {
				time.Sleep(100 * time.Millisecond)
				if _, err := conn.Write([]byte("x")); err != nil {
					return
				}
			}
		}()
	}
	trickle("POST /channel/prepare HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n{")
	trickle("POST /channel/publish/" + ch.PublisherToken + " HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer t0ken\r\nContent-Length: 100000\r\n\r\nx")
	// Both trickled requests, and not the prepare above finishing its reply.
	waitFor(t, "both requests to be under way", func() bool {
		_, partial := d.hub.requests.unfinished()
		under := 0
		for _, r := range partial {
			if strings.HasSuffix(r, ": body not received whole") {
				under++
			}
		}
		return under == 2
	})

	start := time.Now()
	if err := d.stop(); err != nil {
		t.Errorf("shutdown with two half-received requests: %v (exit status 1), want nil (exit status 0)", err)
	}
	if elapsed := time.Since(start); elapsed > grace+time.Second {
		t.Errorf("shutdown took %v, more than %v and a second", elapsed, grace)
	}
	logs := d.logs.String()
	for _, want := range []string{
		`request="POST /channel/prepare from 127.0.0.1:`,
		`request="POST /channel/publish/#` + fingerprint(ch.PublisherToken) + ` from 127.0.0.1:`,
	} {
		if !strings.Contains(logs, `msg="shutdown: abandoned a request not received whole" `+want) {
			t.Errorf("no warning naming %s in:\n%s", want, logs)
		}
	}

	// A hook that hangs past the shutdown: its delivery is what is lost.
	hang := make(chan struct{})
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-hang:
		}
	}))
	t.Cleanup(hook.Close)
	t.Cleanup(func() { close(hang) })
	d = startDaemonWith(t, func(c *config) {
		c.shutdown = grace
		c.hook.timeout = time.Minute
	})
	ch = d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.URL))
	c := d.dial(ch.SubscriberToken)
	c.send(true, websocket.TextFrame, []byte("never delivered"))
	c.send(true, websocket.CloseFrame, closePayload(closeNormal))
	c.expectClose(closeNormal)
	waitFor(t, "the POST to be under way", func() bool { return d.hub.pendingHooks() == 1 })
	err := d.stop()
	if err == nil || !strings.Contains(err.Error(), "abandoned 1 hook delivery(ies) not done") || strings.Contains(err.Error(), "subscriber") || strings.Contains(err.Error(), "request") {
		t.Errorf("shutdown with a hanging hook: %v; want it to name the one hook delivery, and only that", err)
	}
}

func TestStateFileIsLocked(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state.json")
	d := startDaemon(t, "-state-file", state)
	d.prepare(`{"tag": "first"}`)
	journal, _ := os.ReadFile(state + ".journal")
	err := run(context.Background(), []string{"-bind", "127.0.0.1", "-port", "0", "-state-file", state}, func(string) string { return "" }, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "is in use by another gockets") || exitStatus(err) != 1 {
		t.Fatalf("a second daemon on the same state file: %v", err)
	}
	if after, _ := os.ReadFile(state + ".journal"); !bytes.Equal(after, journal) || len(journal) == 0 {
		t.Errorf("the second daemon touched the journal:\n%q\n%q", journal, after)
	}
	d.prepare(`{"tag": "second"}`)
	if err := d.stop(); err != nil {
		t.Fatal(err)
	}
	if channels, err := savedChannels(state); err != nil || len(channels) != 2 {
		t.Errorf("state after: %+v, %v", channels, err)
	}
}

// ---- Closing on time, whatever the subscriber reads ----

// slowReadRate is how fast a slow subscriber in these tests reads, in bytes
// per second: a phone on a poor network, far slower than the daemon writes.
const slowReadRate = 2 << 20

// throttledConn reads at most rate bytes per second.
type throttledConn struct {
	net.Conn
	rate int
}

func (c throttledConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p[:min(len(p), c.rate/100)])
	time.Sleep(time.Duration(n) * time.Second / time.Duration(c.rate))
	return n, err
}

// dialSlow subscribes with a client that reads, but at slowReadRate.
func (d *daemon) dialSlow(subscriberToken string) *wsClient {
	d.t.Helper()
	u, err := url.Parse(d.wsURL(subscriberToken))
	if err != nil {
		d.t.Fatal(err)
	}
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		d.t.Fatalf("dial %s: %v", u.Host, err)
	}
	d.t.Cleanup(func() { conn.Close() })
	c, resp := handshake(d.t, throttledConn{conn, slowReadRate}, u, nil)
	if c == nil {
		d.t.Fatalf("subscribe: status %s", resp.Status)
	}
	return c
}

// readUntilClose reads numbered messages ("N:" and size bytes after it), in
// order from 0 and each whole, until a close frame with code; it answers the
// close and expects the end of the connection. It returns when each
// message and the close frame arrived.
func (c *wsClient) readUntilClose(code, size int) (arrived []time.Time, closed time.Time) {
	c.t.Helper()
	for {
		op, p := c.next()
		if op == websocket.CloseFrame {
			closed = time.Now()
			if len(p) < 2 || int(binary.BigEndian.Uint16(p)) != code {
				c.t.Fatalf("after %d messages: close frame %q, want code %d", len(arrived), p, code)
			}
			c.send(true, websocket.CloseFrame, p[:2])
			if _, err := c.br.ReadByte(); !errors.Is(err, io.EOF) {
				c.t.Fatalf("after the close frame: %v, want EOF", err)
			}
			return arrived, closed
		}
		prefix := strconv.Itoa(len(arrived)) + ":"
		if op != websocket.TextFrame || !strings.HasPrefix(string(p), prefix) || len(p) != len(prefix)+size {
			c.t.Fatalf("got frame %d of %d bytes %.12q, want message %s of %d bytes", op, len(p), p, prefix, len(prefix)+size)
		}
		arrived = append(arrived, time.Now())
	}
}

// tryPublish publishes from any goroutine: it returns what went wrong
// instead of failing the test.
func (d *daemon) tryPublish(token, body string) (publishAnswer, error) {
	var r publishAnswer
	req, err := http.NewRequest("POST", d.url+"/channel/publish/"+token, strings.NewReader(body))
	if err != nil {
		return r, err
	}
	req.Host = "localhost"
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return r, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return r, fmt.Errorf("publish: %s", resp.Status)
	}
	return r, json.NewDecoder(resp.Body).Decode(&r)
}

// fillSlowReader publishes n numbered messages of size bytes after their
// number: far more than a slow reader takes in drainWait, fewer than its
// send queue holds.
func (d *daemon) fillSlowReader(token string, n, size int) {
	d.t.Helper()
	pad := strings.Repeat("x", size)
	for i := range n {
		if r := d.publish(token, strconv.Itoa(i)+":"+pad); r.Subscribers != 1 {
			d.t.Fatalf("message %d handed to %d subscribers", i, r.Subscribers)
		}
	}
}

func TestDeleteClosesASlowReaderOnTime(t *testing.T) {
	const n, size = 800, 16 << 10 // 13 MB: 6 s of reading
	d := startDaemon(t, "-log-level", "2")
	ch := d.prepare("")
	c := d.dialSlow(ch.SubscriberToken)
	d.fillSlowReader(ch.PublisherToken, n, size)
	start := time.Now()
	d.mustCall("DELETE", "/channel/publish/"+ch.PublisherToken, "", http.StatusOK, nil)
	arrived, closed := c.readUntilClose(closeNormal, size)
	took := closed.Sub(start)
	t.Logf("after DELETE: %d of %d messages, then 1000 after %v", len(arrived), n, took)
	// drainWait for what is queued; a second more for what the network
	// already held when the daemon stopped.
	if took > drainWait+time.Second {
		t.Errorf("the close frame came %v after DELETE, want at most %v", took, drainWait+time.Second)
	}
}

func TestShutdownClosesASlowReaderOnTime(t *testing.T) {
	const n, size = 800, 16 << 10
	addr, _, stop := runDaemon(t, "-bind", "127.0.0.1")
	d := &daemon{t: t, url: "http://" + addr}
	ch := d.prepare("")
	c := d.dialSlow(ch.SubscriberToken)
	d.fillSlowReader(ch.PublisherToken, n, size)
	start := time.Now()
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	arrived, closed := c.readUntilClose(closeGoingAway, size)
	err := recv(t, stopped, "run to return")
	took, exited := closed.Sub(start), time.Since(start)
	t.Logf("after SIGTERM: %d of %d messages, then 1001 after %v; exit after %v", len(arrived), n, took, exited)
	if err != nil {
		t.Errorf("run returned %v, want nil (exit 0)", err)
	}
	if took > drainWait+time.Second {
		t.Errorf("the close frame came %v after SIGTERM, want at most %v", took, drainWait+time.Second)
	}
}

func TestShutdownWithANonReaderTakesDrainWait(t *testing.T) {
	addr, _, stop := runDaemon(t, "-bind", "127.0.0.1")
	d := &daemon{t: t, url: "http://" + addr}
	ch := d.prepare("")
	d.dial(ch.SubscriberToken) // and never read
	big := strings.Repeat("x", 64<<10)
	for range 300 { // 19 MB: far more than the kernel holds for it
		d.publish(ch.PublisherToken, big)
	}
	start := time.Now()
	err := stop()
	took := time.Since(start)
	t.Logf("shutdown with a subscriber that does not read took %v", took)
	if err != nil {
		t.Errorf("run returned %v, want nil (exit 0)", err)
	}
	if took > drainWait+closeGrace/2 {
		t.Errorf("shutdown took %v, want drainWait (%v) and little more", took, drainWait)
	}
}

func TestTooSlowReaderGetsItsCloseWithinAGrace(t *testing.T) {
	const size = 32 << 10
	d := startDaemon(t, "-log-level", "2")
	ch := d.prepare("")
	c := d.dialSlow(ch.SubscriberToken)
	dropped := make(chan time.Time, 1)
	published := make(chan error, 1)
	go func() { // until the queue is full and the subscriber dropped
		pad := strings.Repeat("x", size)
		for i := range 4 * sendQueueLimit {
			r, err := d.tryPublish(ch.PublisherToken, strconv.Itoa(i)+":"+pad)
			if err != nil || r.Subscribers == 0 {
				dropped <- time.Now()
				published <- err
				return
			}
		}
		published <- errors.New("never dropped")
	}()
	arrived, closed := c.readUntilClose(closePolicyViolation, size)
	if err := recv(t, published, "the publisher"); err != nil {
		t.Fatal(err)
	}
	drop := <-dropped
	after := len(arrived) - sort.Search(len(arrived), func(i int) bool { return arrived[i].After(drop) })
	took := closed.Sub(drop)
	t.Logf("dropped after %d messages; then %d more and 1008 after %v", len(arrived)-after, after, took)
	// closeGrace for the write under way and the close frame; a second more
	// for what the network already held.
	if took > closeGrace+time.Second {
		t.Errorf("1008 came %v after the drop, want at most %v", took, closeGrace+time.Second)
	}
	if most := slowReadRate / size; after > most {
		t.Errorf("%d messages after the drop, want at most %d (a second of reading)", after, most)
	}
}

// ---- Publishers that write ----

// frameReader reads a server's frames from any goroutine: it returns
// errors instead of failing the test.
type frameReader struct {
	conn net.Conn
	br   *bufio.Reader
}

// messages reads n text messages, answering nothing (no ping comes within
// the test).
func (r frameReader) messages(n int) ([]string, error) {
	var got []string
	for len(got) < n {
		if err := r.conn.SetReadDeadline(time.Now().Add(waitTimeout)); err != nil {
			return got, err
		}
		var hdr [2]byte
		if _, err := io.ReadFull(r.br, hdr[:]); err != nil {
			return got, fmt.Errorf("after %d messages: %w", len(got), err)
		}
		length := uint64(hdr[1] & 0x7f)
		if length >= 126 {
			ext := make([]byte, 2)
			if length == 127 {
				ext = make([]byte, 8)
			}
			if _, err := io.ReadFull(r.br, ext); err != nil {
				return got, err
			}
			length = 0
			for _, x := range ext {
				length = length<<8 | uint64(x)
			}
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(r.br, payload); err != nil {
			return got, err
		}
		if hdr[0] != 0x80|websocket.TextFrame {
			return got, fmt.Errorf("after %d messages: frame % x", len(got), hdr)
		}
		got = append(got, string(payload))
	}
	return got, nil
}

func TestPublishersWriteDirectlyWithoutReorderingOrCutting(t *testing.T) {
	const publishers, each, size = 4, 150, 16 << 10 // 9.6 MB: more than the kernel holds for one subscriber
	d := startDaemon(t, "-log-level", "2")
	ch := d.prepare("")
	// One subscriber reads at once, one slowly, one only after every
	// publish: the kernel's buffers for the last two fill, so publishers'
	// writes stop in the middle of frames, and the writers finish them
	// while more publishes arrive.
	fast, slow, paused := d.dial(ch.SubscriberToken), d.dialSlow(ch.SubscriberToken), d.dial(ch.SubscriberToken)
	type result struct {
		got []string
		err error
	}
	readers := []chan result{make(chan result, 1), make(chan result, 1)}
	for i, c := range []*wsClient{fast, slow} {
		go func() {
			got, err := frameReader{c.conn, c.br}.messages(publishers * each)
			readers[i] <- result{got, err}
		}()
	}
	var wg sync.WaitGroup
	failed := make(chan error, publishers)
	pad := strings.Repeat("x", size)
	for p := range publishers {
		wg.Go(func() {
			for i := range each {
				r, err := d.tryPublish(ch.PublisherToken, fmt.Sprintf("%d:%d:%s", p, i, pad))
				if err == nil && r.Subscribers != 3 {
					err = fmt.Errorf("publish %d:%d handed to %d subscribers", p, i, r.Subscribers)
				}
				if err != nil {
					failed <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(failed)
	for err := range failed {
		t.Fatal(err)
	}
	got, err := frameReader{paused.conn, paused.br}.messages(publishers * each)
	all := []result{recv(t, readers[0], "the fast reader"), recv(t, readers[1], "the slow reader"), {got, err}}
	for i, r := range all {
		if r.err != nil {
			t.Fatalf("subscriber %d: %v", i, r.err)
		}
		next := make([]int, publishers) // each publisher's messages arrive in its order
		for _, m := range r.got {
			var p, n int
			if _, err := fmt.Sscanf(m, "%d:%d:", &p, &n); err != nil || p < 0 || p >= publishers || n != next[p] || !strings.HasSuffix(m, ":"+pad) {
				t.Fatalf("subscriber %d: got %.16q (%d bytes) after %v", i, m, len(m), next)
			}
			next[p]++
		}
		if !slices.Equal(r.got, all[0].got) {
			t.Errorf("subscriber %d got the messages in another order than subscriber 0", i)
		}
	}
}

func TestOfferClaimsOnlyASubscriberWithNothingUnderWay(t *testing.T) {
	d := startDaemon(t, "-log-level", "2")
	ch := d.hub.byPublisherToken(d.prepare("").PublisherToken)
	m := textMessage([]byte("m"))
	for _, tc := range []struct {
		name  string
		state func(s *subscriber)
		want  int
	}{
		{"idle WebSocket over TCP", func(*subscriber) {}, claimed},
		{"SSE or TLS: no direct way out", func(s *subscriber) { s.out = nil }, enqueued},
		{"a write under way", func(s *subscriber) { s.busy = true }, enqueued},
		{"messages queued", func(s *subscriber) { s.queue = []*message{m} }, enqueued},
		{"a frame half written", func(s *subscriber) { s.rest = m.frame[1:] }, enqueued},
		{"a write failed", func(s *subscriber) { s.broken = true }, enqueued},
		{"closing", func(s *subscriber) { s.bye = farewell{code: closeNormal} }, enqueued},
		{"queue full", func(s *subscriber) { s.queue = make([]*message, d.hub.cfg.sendQueue) }, full},
		{"queue full with the writer's batch", func(s *subscriber) { s.busy, s.writing = true, d.hub.cfg.sendQueue }, full},
		{"queue full with a half-written frame", func(s *subscriber) {
			s.queue, s.rest = make([]*message, d.hub.cfg.sendQueue-1), m.frame[1:]
		}, full},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := d.hub.newSubscriber(ch, "websocket")
			s.out = &frameBatch{fd: -1}
			tc.state(s)
			queued := len(s.queue)
			if got := s.offer(m, nil); got != tc.want {
				t.Fatalf("offer: %d, want %d (claimed %d, enqueued %d, full %d)", got, tc.want, claimed, enqueued, full)
			}
			if tc.want == claimed && !s.busy {
				t.Error("claimed without marking the write under way")
			}
			if tc.want == enqueued && len(s.queue) != queued+1 {
				t.Errorf("queue %d, want %d", len(s.queue), queued+1)
			}
		})
	}
}

// ---- Frames reach only their own connection ----

// TestFramesReachOnlyTheirOwnConnection: publishers and writers send frames
// with a raw system call to a descriptor number taken at the upgrade, past
// net.Conn's reference count. Were that descriptor ever closed while a
// write could still use the number, the kernel would give the number to the
// next connection opened, and a channel's frames would go to a stranger:
// another subscriber, an admin client, a socket of the daemon's own.
// Here subscribers of several channels churn (they vanish mid-stream, reset
// the connection, close cleanly, stop reading and may be evicted, lose
// their channel to a DELETE) while publishers send messages that name
// their channel, of sizes the kernel takes at once or only in part. Every
// client checks that each frame it gets is well formed, whole and of its
// own channel, in its publisher's order; every admin request must answer as
// the contract says. Clients and daemon share this process's descriptors,
// so a number reused is reused among them.
func TestFramesReachOnlyTheirOwnConnection(t *testing.T) {
	const (
		channels   = 6
		publishers = 2   // per channel
		churners   = 3   // per channel, but the first
		wide       = 120 // subscribers that churn on the first channel, whose fan-outs take long
		duration   = 3 * time.Second
	)
	d := startDaemonWith(t, func(c *config) { c.sendQueue = 8 }, "-backlog", "0", "-log-level", "2")
	transport := &http.Transport{MaxIdleConnsPerHost: 4}
	t.Cleanup(transport.CloseIdleConnections)
	client := &http.Client{Transport: transport, Timeout: waitTimeout}

	// A slot holds a channel that a DELETE replaces with a new one; the
	// tag names the slot and the generation.
	type tokens struct {
		pub, sub, tag string
		deleted       atomic.Bool // set before the DELETE is sent
	}
	slots := make([]atomic.Pointer[tokens], channels)
	prepare := func(slot, gen int) (*tokens, error) {
		var ch channelJSON
		status, body, err := adminCall(d, client, "POST", "/channel/prepare", nil)
		if err == nil && (status != http.StatusOK || json.Unmarshal([]byte(body), &ch) != nil) {
			err = fmt.Errorf("prepare: %d %s", status, body)
		}
		return &tokens{pub: ch.PublisherToken, sub: ch.SubscriberToken, tag: fmt.Sprintf("c%d.%d", slot, gen)}, err
	}
	for i := range slots {
		tk, err := prepare(i, 0)
		if err != nil {
			t.Fatal(err)
		}
		slots[i].Store(tk)
	}

	var counts struct{ subscriptions, refused, frames, bytes, evicted, published, deletes atomic.Int64 }
	deadline := time.Now().Add(duration)
	var wg sync.WaitGroup
	for slot := range slots {
		for p := range publishers {
			wg.Go(func() {
				rng := mathrand.New(mathrand.NewPCG(uint64(slot), uint64(p)))
				for seq := 0; time.Now().Before(deadline); seq++ {
					tk := slots[slot].Load()
					size := 64
					switch rng.IntN(16) {
					case 0, 1:
						if slot != 0 { // to fill slow readers, not to slow the wide fan-outs
							size = 200 << 10 // more than the kernel takes at once from a reader that lags
						}
					case 2, 3:
						size = 6 << 10
					}
					status, reply, err := adminCall(d, client, "POST", "/channel/publish/"+tk.pub, ownMessage(tk.tag, p, seq, size))
					switch {
					case err != nil:
						t.Errorf("publish to %s: %v", tk.tag, err)
						return
					case status == http.StatusOK && strings.HasPrefix(reply, `{"type":"INF"`):
						counts.published.Add(1)
					case status == http.StatusNotFound && tk.deleted.Load():
					default:
						t.Errorf("publish to %s: %d %s", tk.tag, status, reply)
						return
					}
				}
			})
		}
		subscribers := churners
		if slot == 0 {
			subscribers = wide
		}
		for c := range subscribers {
			wg.Go(func() {
				rng := mathrand.New(mathrand.NewPCG(uint64(slot), uint64(100+c)))
				for time.Now().Before(deadline) {
					tk := slots[slot].Load()
					n, err := churnOnce(d, tk.sub, tk.tag, rng, deadline)
					counts.frames.Add(int64(n.frames))
					counts.bytes.Add(n.bytes)
					if n.evicted {
						counts.evicted.Add(1)
					}
					switch {
					case err != nil:
						t.Errorf("subscriber of %s: %v", tk.tag, err)
						return
					case n.refused && !tk.deleted.Load():
						t.Errorf("subscriber of %s refused, yet its channel was not deleted", tk.tag)
						return
					case n.refused:
						counts.refused.Add(1)
					default:
						counts.subscriptions.Add(1)
					}
				}
			})
		}
	}
	wg.Go(func() { // descriptors of a stranger: nothing may ever arrive on them
		for time.Now().Before(deadline) {
			if err := canary(50 * time.Microsecond); err != nil {
				t.Error(err)
				return
			}
		}
	})
	wg.Go(func() { // the app deletes channels and makes new ones
		tick := time.NewTicker(150 * time.Millisecond)
		defer tick.Stop()
		end := time.NewTimer(time.Until(deadline))
		defer end.Stop()
		for gen := 1; ; gen++ {
			select {
			case <-tick.C:
			case <-end.C:
				return
			}
			slot := gen % channels
			old := slots[slot].Load()
			old.deleted.Store(true)
			status, body, err := adminCall(d, client, "DELETE", "/channel/publish/"+old.pub, nil)
			if err == nil && status != http.StatusOK {
				err = fmt.Errorf("%d %s", status, body)
			}
			if err != nil {
				t.Errorf("delete %s: %v", old.tag, err)
				return
			}
			counts.deletes.Add(1)
			tk, err := prepare(slot, gen)
			if err != nil {
				t.Error(err)
				return
			}
			slots[slot].Store(tk)
		}
	})
	wg.Wait()
	t.Logf("%d subscriptions (and %d refused: channel deleted), %d frames (%d KiB) checked, %d slow readers evicted, %d publishes, %d deletes",
		counts.subscriptions.Load(), counts.refused.Load(), counts.frames.Load(), counts.bytes.Load()>>10,
		counts.evicted.Load(), counts.published.Load(), counts.deletes.Load())
	if counts.frames.Load() < 1000 || counts.subscriptions.Load() < 100 || counts.deletes.Load() == 0 {
		t.Errorf("too little happened to judge: %d frames, %d subscriptions, %d deletes",
			counts.frames.Load(), counts.subscriptions.Load(), counts.deletes.Load())
	}
}

// canary opens a pair of connected sockets, which take the lowest
// descriptor numbers free, as any connection or file opened would, and
// says whether anything arrives on either, waiting hold for each.
func canary(hold time.Duration) error {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		return fmt.Errorf("socketpair: %w", err)
	}
	var ends []*os.File
	defer func() {
		for _, end := range ends {
			end.Close()
		}
	}()
	for _, fd := range fds {
		syscall.CloseOnExec(fd)
		if err := syscall.SetNonblock(fd, true); err != nil {
			syscall.Close(fd)
			return fmt.Errorf("socketpair: %w", err)
		}
		ends = append(ends, os.NewFile(uintptr(fd), "canary")) // non-blocking: its reads take deadlines
	}
	buf := make([]byte, 64)
	for i, end := range ends {
		if err := end.SetReadDeadline(time.Now().Add(hold)); err != nil {
			return fmt.Errorf("canary deadline: %w", err)
		}
		if n, _ := end.Read(buf); n > 0 {
			return fmt.Errorf("descriptor %d, which no connection of the daemon has, received %q", fds[i], buf[:n])
		}
	}
	return nil
}

// adminCall makes an admin request from any goroutine: it returns errors
// rather than failing the test.
func adminCall(d *daemon, client *http.Client, method, path string, body []byte) (int, string, error) {
	req, err := http.NewRequest(method, d.url+path, bytes.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Host = "localhost"
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// ownMessage is the seq-th message publisher p sends to the channel tagged
// tag: its header names them, and the rest repeats the tag, so that a byte
// from elsewhere shows.
func ownMessage(tag string, p, seq, size int) []byte {
	b := fmt.Appendf(make([]byte, 0, size+len(tag)), "%s %d %d ", tag, p, seq)
	header := len(b)
	for len(b) < size {
		b = append(append(b, tag...), '|')
	}
	return b[:max(size, header)]
}

// churned is what one subscription saw.
type churned struct {
	frames  int
	bytes   int64
	refused bool // 404 or 403: its channel had just been deleted
	evicted bool // closed with 1008: too slow
}

// churnOnce subscribes to the channel tagged tag and ends one of several
// ways, checking every frame that arrives; the error says what was wrong.
// Nothing waits past deadline and a second.
func churnOnce(d *daemon, subscriberToken, tag string, rng *mathrand.Rand, deadline time.Time) (churned, error) {
	var n churned
	u, err := url.Parse(d.wsURL(subscriberToken))
	if err != nil {
		return n, err
	}
	way := rng.IntN(5)
	dialer := &net.Dialer{}
	if way == 3 { // a reader that stops: a small receive buffer fills at once
		dialer.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
			return errors.Join(err, serr)
		}
	}
	conn, err := dialer.Dial("tcp", u.Host)
	if err != nil {
		return n, err
	}
	defer conn.Close()
	end := deadline.Add(time.Second)
	if err := conn.SetDeadline(end); err != nil {
		return n, err
	}
	key := make([]byte, 16)
	rand.Read(key)
	if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
		u.Path, u.Host, base64.StdEncoding.EncodeToString(key)); err != nil {
		return n, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return n, fmt.Errorf("upgrade answered with no HTTP response (another connection's frame?): %w", err)
	}
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusSwitchingProtocols:
	case http.StatusNotFound, http.StatusForbidden: // deleted before the lookup, or between it and the join
		n.refused = true
		return n, nil
	default:
		return n, fmt.Errorf("upgrade: %s", resp.Status)
	}

	next := map[int]int{} // each publisher's next seq, at least
	// read takes a frame and checks it: a message of this channel, or a
	// close frame, whose code it returns.
	read := func() (closed int, err error) {
		op, payload, err := readServerFrame(br, 1<<20)
		if err != nil {
			return 0, err
		}
		switch op {
		case websocket.TextFrame:
		case websocket.CloseFrame:
			if len(payload) < 2 {
				return 0, fmt.Errorf("close frame % x", payload)
			}
			return int(binary.BigEndian.Uint16(payload)), nil
		default:
			return 0, fmt.Errorf("frame with opcode %d: %.32q", op, payload)
		}
		var got string
		var p, seq int
		if _, err := fmt.Sscanf(string(payload[:min(len(payload), 64)]), "%s %d %d ", &got, &p, &seq); err != nil || got != tag ||
			!bytes.Equal(payload, ownMessage(tag, p, seq, len(payload))) {
			return 0, fmt.Errorf("a subscriber of %s got a frame of %d bytes: %.48q", tag, len(payload), payload)
		}
		if seq < next[p] {
			return 0, fmt.Errorf("a subscriber of %s got message %d of publisher %d after %d", tag, seq, p, next[p]-1)
		}
		next[p] = seq + 1
		n.frames++
		n.bytes += int64(len(payload))
		return 0, nil
	}
	// drain reads until the server closes, or until its time is up.
	drain := func(until time.Time, codes ...int) error {
		if err := conn.SetReadDeadline(until); err != nil {
			return err
		}
		for {
			code, err := read()
			switch {
			case isTimeout(err) && !time.Now().Before(until):
				return nil
			case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
				return nil // after a write the server had to cut, no close frame can follow
			case err != nil:
				return err
			case code == closePolicyViolation:
				n.evicted = true
				fallthrough
			case code != 0:
				if !slices.Contains(codes, code) {
					return fmt.Errorf("closed with %d, want one of %v", code, codes)
				}
				return nil
			}
		}
	}
	if way < 2 {
		// It goes at a moment of its own, not just after a frame: most
		// likely while a publisher's fan-out has claimed it and not yet
		// written to it, or while its writer is at work.
		stay := time.Now().Add(time.Duration(1+rng.IntN(40)) * time.Millisecond)
		if err := conn.SetReadDeadline(earliest(end, stay)); err != nil {
			return n, err
		}
	}
	if way != 3 {
		frames := 1 + rng.IntN(30)
		for i := 0; way < 2 || i < frames; i++ {
			code, err := read()
			switch {
			case isTimeout(err):
				return n, nil // its time, or the test's, is up
			case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET):
				return n, nil // evicted in the middle of a write: no close frame can follow
			case err != nil:
				return n, err
			case code != 0:
				if code != closeNormal && code != closePolicyViolation {
					return n, fmt.Errorf("closed with %d", code)
				}
				n.evicted = code == closePolicyViolation
				return n, nil
			}
		}
	}
	switch way {
	case 0: // vanishes mid-stream
		return n, nil
	case 1: // resets the connection
		return n, conn.(*net.TCPConn).SetLinger(0)
	case 2: // closes cleanly
		mask := []byte{0, 0, 0, 0}
		if _, err := conn.Write(append([]byte{0x80 | websocket.CloseFrame, 0x80 | 2}, append(mask, 0x03, 0xe8)...)); err != nil {
			return n, nil // the server has closed already
		}
		return n, drain(end, closeNormal, closePolicyViolation)
	case 3: // stops reading for a while (evicted if its channel is busy), then reads what came
		<-time.After(time.Until(earliest(end, time.Now().Add(time.Duration(100+rng.IntN(900))*time.Millisecond))))
		return n, drain(earliest(end, time.Now().Add(300*time.Millisecond)), closeNormal, closePolicyViolation)
	}
	return n, drain(earliest(end, time.Now().Add(time.Second)), closeNormal, closePolicyViolation) // stays a while: its channel may be deleted
}

// earliest is the earlier of two times.
func earliest(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

// readServerFrame reads a frame a server sent, and refuses what a server
// never sends: a fragment, reserved bits, a masked frame, a payload above
// limit.
func readServerFrame(br *bufio.Reader, limit uint64) (opcode byte, payload []byte, err error) {
	var hdr [2]byte
	if _, err := io.ReadFull(br, hdr[:]); err != nil {
		return 0, nil, err
	}
	if hdr[0]&0xf0 != 0x80 || hdr[1]&0x80 != 0 {
		return 0, nil, fmt.Errorf("frame header % x: a fragment, reserved bits or masked", hdr)
	}
	length := uint64(hdr[1] & 0x7f)
	if length >= 126 {
		ext := make([]byte, 2)
		if length == 127 {
			ext = make([]byte, 8)
		}
		if _, err := io.ReadFull(br, ext); err != nil {
			return 0, nil, err
		}
		length = 0
		for _, x := range ext {
			length = length<<8 | uint64(x)
		}
	}
	if length > limit {
		return 0, nil, fmt.Errorf("frame header % x: %d bytes", hdr, length)
	}
	payload = make([]byte, length)
	if _, err := io.ReadFull(br, payload); err != nil {
		return 0, nil, err
	}
	return hdr[0] & 0x0f, payload, nil
}

// ---- The examples of README.md ----

// TestExamples runs examples/ as README.md does: php -S serves page.php and
// hook.php, php-cli runs publish.php, against the real daemon.
func TestExamples(t *testing.T) {
	php := lookPHP(t)
	const frame = `{"hello":"from the page"}`
	tests := []struct {
		name                    string
		daemonSecret, phpSecret string
		hookLog                 string // what php -S logs for the page's frame
	}{
		{"unsigned, as in the quick start", "", "", "hook: a browser sent " + frame},
		{"signed", "s3cret", "s3cret", "hook: a browser sent " + frame},
		{"unsigned, to a hook that wants a signature", "", "s3cret", "[401]: POST /hook.php"},
		{"signed, to php-fpm without the secret", "s3cret", "", "the request is signed but GOCKETS_HOOK_SECRET is not in my environment"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			addr, _, _ := runDaemon(t, "-hook-secret", tc.daemonSecret)
			d := &daemon{t: t, url: "http://" + addr}
			env := []string{"GOCKETS_URL=http://localhost:" + strings.Split(addr, ":")[1], "TMPDIR=" + t.TempDir()}
			if tc.phpSecret != "" {
				env = append(env, "GOCKETS_HOOK_SECRET="+tc.phpSecret)
			}
			web, webLog := startPHPServer(t, php, env)

			token := regexp.MustCompile(`const token = "([A-Z2-7]{26})";`)
			page := func() string {
				resp, err := http.Get(web + "/page.php")
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				body, err := io.ReadAll(resp.Body)
				m := token.FindSubmatch(body)
				if err != nil || resp.StatusCode != http.StatusOK || m == nil {
					t.Fatalf("page.php: %d %v without a subscriber token:\n%s\nphp -S:\n%s", resp.StatusCode, err, body, webLog)
				}
				return string(m[1])
			}
			sub := page()
			c, resp := dialWS(t, d.wsURL(sub), http.Header{"Origin": {web}})
			if c == nil {
				t.Fatalf("subscribe with page.php's token: %s", resp.Status)
			}

			out := runPHP(t, php, env, "examples/publish.php", "Your order has shipped")
			if want := "sent \"Your order has shipped\" to demo-user's page: 1 subscriber(s)\n"; out != want {
				t.Errorf("publish.php said %q, want %q", out, want)
			}
			c.expectText("Your order has shipped")
			c.send(true, websocket.TextFrame, []byte(frame))
			waitFor(t, "php -S to log "+tc.hookLog, func() bool { return strings.Contains(webLog.String(), tc.hookLog) })

			if again := page(); again != sub {
				t.Errorf("page.php prepared a second channel instead of reusing the user's")
			}
			var channels struct{ Channels []channelJSON }
			d.mustCall("GET", "/channel", "", http.StatusOK, &channels)
			d.mustCall("DELETE", "/channel/publish/"+channels.Channels[0].PublisherToken, "", http.StatusOK, nil)
			if fresh := page(); fresh == sub {
				t.Errorf("page.php kept a deleted channel")
			}
		})
	}
}

// TestREADMEShowsTheExamples keeps the files README.md shows the same as
// examples/, which TestExamples runs.
func TestREADMEShowsTheExamples(t *testing.T) {
	read := func(name string) string {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	readme := read("README.md")
	for _, name := range []string{"quickstart.html", "sse.html", "hook.php"} {
		if !strings.Contains(readme, "```"+strings.TrimPrefix(filepath.Ext(name), ".")+"\n"+read("examples/"+name)+"```\n") {
			t.Errorf("README.md does not show examples/%s as it is", name)
		}
	}
	// README shows page.php's PHP, and says its page is the quick start's
	// with two lines printed by PHP.
	php, html, _ := strings.Cut(read("examples/page.php"), "?>\n")
	if !strings.Contains(readme, "```php\n"+php+"?>\n```\n") {
		t.Error("README.md does not show the PHP of examples/page.php as it is")
	}
	quickstart := strings.Split(read("examples/quickstart.html"), "\n")
	printed := strings.Split(html, "\n")
	if len(quickstart) != len(printed) {
		t.Fatalf("page.php's page has %d lines, the quick start's %d", len(printed), len(quickstart))
	}
	for i := range printed {
		if printed[i] != quickstart[i] && !strings.Contains(readme, "```js\n"+printed[i]+"\n") && !strings.Contains(readme, "\n"+printed[i]+"\n```\n") {
			t.Errorf("page.php's line %q is neither the quick start's %q nor shown in README.md", printed[i], quickstart[i])
		}
	}
}

// lookPHP finds php-cli: under CI=true a missing php fails the test.
func lookPHP(t *testing.T) string {
	t.Helper()
	php, err := exec.LookPath("php")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("php not found: the PHP examples need php-cli (.ci/run installs it)")
		}
		t.Skip("php not found: install php-cli to run the PHP examples")
	}
	return php
}

// phpEnv is the environment of a PHP example: this one without GOCKETS_*
// (a developer's own settings), and env.
func phpEnv(env []string) []string {
	var kept []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envPrefix) {
			kept = append(kept, kv)
		}
	}
	return append(kept, env...)
}

// startPHPServer runs php -S on examples/, as the quick start does, on a
// free port of 127.0.0.1; it returns its URL and what it logs.
func startPHPServer(t *testing.T, php string, env []string) (string, *syncBuffer) {
	t.Helper()
	return startPHPServerIn(t, php, env, "examples")
}

// startPHPServerIn serves the PHP files of dir with php -S.
func startPHPServerIn(t *testing.T, php string, env []string, dir string) (string, *syncBuffer) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // php takes the port over; another process taking it first fails the wait below
	logs := &syncBuffer{}
	cmd := exec.Command(php, "-S", addr, "-t", dir)
	cmd.Env = phpEnv(env)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("php -S: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("php -S log:\n%s", logs)
		}
	})
	waitFor(t, "php -S to start", func() bool {
		select {
		case <-exited:
			t.Fatalf("php -S ended:\n%s", logs)
		default:
		}
		return strings.Contains(logs.String(), "("+"http://"+addr+") started")
	})
	return "http://" + addr, logs
}

// runPHP runs a PHP example from the command line and returns its output.
func runPHP(t *testing.T, php string, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command(php, args...)
	cmd.Env = phpEnv(env)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("php %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.String())
	}
	return string(out)
}

// ---- The systemd unit of README.md ----

// TestSystemdUnitIsHardened checks README.md's unit with systemd-analyze,
// where it is installed: verify finds nothing to say, and security scores
// its exposure under 2.0.
func TestSystemdUnitIsHardened(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not found: install systemd to check the unit")
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)```ini\n(\\[Unit\\].*?)```").FindSubmatch(readme)
	if m == nil {
		t.Fatal("README.md has no unit")
	}
	// verify wants ExecStart to exist: this test binary stands in for it.
	unit := strings.Replace(string(m[1]), "ExecStart=/usr/local/bin/gockets", "ExecStart="+os.Args[0], 1)
	path := filepath.Join(t.TempDir(), "gockets.service")
	if err := os.WriteFile(path, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(analyze, "verify", path).CombinedOutput(); err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	out, err := exec.Command(analyze, "security", "--offline=yes", path).CombinedOutput()
	score := regexp.MustCompile(`Overall exposure level for gockets.service: (\d+\.\d)`).FindSubmatch(out)
	if err != nil || score == nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	if exposure, _ := strconv.ParseFloat(string(score[1]), 64); exposure >= 2.0 {
		t.Errorf("exposure %s, want under 2.0:\n%s", score[1], out)
	}
	t.Logf("systemd-analyze security: exposure %s", score[1])
}

// ---- Several nodes on one Redis ----

// redisServer is a real redis-server in a child process, on a free port of
// 127.0.0.1, killed by its PID when the test ends.
type redisServer struct {
	t    testing.TB
	port int
	args []string
	tls  *tls.Config // how try connects when Redis speaks only TLS; nil: plain
	cmd  *exec.Cmd
	done chan struct{}
}

// startRedis starts redis-server. Without it the test fails in CI (which
// installs it) and is skipped elsewhere, saying why.
func startRedis(t testing.TB, args ...string) *redisServer {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("redis-server is not installed: the tests of several nodes need it (.ci/run installs it with apt-get)")
		}
		t.Skip("redis-server is not installed: skipping the tests of several nodes (apt-get install redis-server)")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	rs := &redisServer{t: t, port: port, args: args}
	if slices.Contains(args, "--tls-cert-file") {
		rs.tls = &tls.Config{InsecureSkipVerify: true} // the test's own Redis, on loopback
	}
	rs.start()
	t.Cleanup(rs.kill)
	return rs
}

// startRedisTLS starts redis-server speaking only TLS, with a certificate
// of its own for 127.0.0.1; caFile is what a client must trust for it.
func startRedisTLS(t *testing.T) (rs *redisServer, caFile string) {
	t.Helper()
	certFile, keyFile, _ := selfSigned(t)
	rs = startRedis(t, "--tls-cert-file", certFile, "--tls-key-file", keyFile, "--tls-ca-cert-file", certFile,
		"--tls-auth-clients", "no")
	return rs, certFile
}

func (rs *redisServer) start() {
	rs.t.Helper()
	ports := []string{"--port", strconv.Itoa(rs.port)}
	if rs.tls != nil {
		ports = []string{"--port", "0", "--tls-port", strconv.Itoa(rs.port)}
	}
	args := append(append(ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"), rs.args...)
	rs.cmd = exec.Command("redis-server", args...)
	var out syncBuffer
	rs.cmd.Stdout, rs.cmd.Stderr = &out, &out
	if err := rs.cmd.Start(); err != nil {
		rs.t.Fatalf("start redis-server: %v", err)
	}
	rs.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(rs.cmd, rs.done)
	waitFor(rs.t, "redis-server to accept connections", func() bool {
		select {
		case <-rs.done:
			rs.t.Fatalf("redis-server exited:\n%s", out.String())
		default:
		}
		_, err := rs.try("PING")
		var re respError
		return err == nil || errors.As(err, &re) // NOAUTH: it runs, with a password
	})
}

// kill ends redis-server at once (SIGKILL), as a crash would.
func (rs *redisServer) kill() {
	rs.cmd.Process.Signal(syscall.SIGCONT) // a paused one would not die before it runs again
	rs.cmd.Process.Kill()
	<-rs.done
}

func (rs *redisServer) url() string {
	if rs.tls != nil {
		return fmt.Sprintf("rediss://127.0.0.1:%d/0", rs.port)
	}
	return fmt.Sprintf("redis://127.0.0.1:%d/0", rs.port)
}

// try runs one command on a connection of its own.
func (rs *redisServer) try(args ...any) (any, error) {
	var conn net.Conn
	var err error
	addr := fmt.Sprintf("127.0.0.1:%d", rs.port)
	if rs.tls != nil {
		conn, err = tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", addr, rs.tls)
	} else {
		conn, err = net.DialTimeout("tcp", addr, time.Second)
	}
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write(appendCommand(nil, args...)); err != nil {
		return nil, err
	}
	reply, err := readReply(bufio.NewReader(conn))
	if e, ok := reply.(respError); ok {
		return nil, e
	}
	return reply, err
}

func (rs *redisServer) do(args ...any) any {
	rs.t.Helper()
	reply, err := rs.try(args...)
	if err != nil {
		rs.t.Fatalf("redis %v: %v", args, err)
	}
	return reply
}

// keys lists the keys that match pattern.
func (rs *redisServer) keys(pattern string) []string {
	rs.t.Helper()
	var keys []string
	for _, k := range rs.do("KEYS", pattern).([]any) {
		keys = append(keys, string(k.([]byte)))
	}
	slices.Sort(keys)
	return keys
}

// startNode runs the daemon with run(), on Redis, as a user would start it.
func startNode(t *testing.T, redisURL string, args ...string) *daemon {
	t.Helper()
	addr, logs, _ := runDaemon(t, append([]string{"-bind", "127.0.0.1", "-redis", redisURL}, args...)...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("node %s log:\n%s", addr, logs)
		}
	})
	return &daemon{t: t, url: "http://" + addr, logs: &logs.syncBuffer}
}

func TestRedisEveryRouteOnEveryNode(t *testing.T) {
	rs := startRedis(t)
	a, b, c := startNode(t, rs.url()), startNode(t, rs.url()), startNode(t, rs.url())
	hook := startHook(t, nil)

	// Prepared on A, the channel is the same on B and C.
	ch := a.prepare(`{"subscriber_message_hook_url": "` + hook.url + `", "tag": "room-1"}`)
	want := channelBody(ch)
	for _, d := range []*daemon{a, b, c} {
		if got := d.mustCall("GET", "/channel/"+ch.PublisherToken, "", 200, nil); got != want {
			t.Errorf("show on %s: %s, want %s", d.url, got, want)
		}
		if got := d.mustCall("GET", "/channel/show/"+ch.PublisherToken, "", 200, nil); got != want {
			t.Errorf("old show on %s: %s", d.url, got)
		}
	}
	other := b.prepare("")
	wantList := `{"channels":[` + strings.TrimSuffix(channelBody(ch), "\n") + "," + strings.TrimSuffix(channelBody(other), "\n") + "]}\n"
	if got := c.mustCall("GET", "/channel", "", 200, nil); got != wantList {
		t.Errorf("list on C:\n got %s\nwant %s", got, wantList)
	}
	if got := a.mustCall("GET", "/channel/show?search=^room", "", 200, nil); got != `{"channels":[`+strings.TrimSuffix(want, "\n")+"]}\n" {
		t.Errorf("search on A: %s", got)
	}
	if other.HookURL != nil || other.Tag != nil || other.Listeners != 0 {
		t.Errorf("prepared without a body: %+v", other)
	}

	// A subscriber on C posts to the hook URL that B's edit sets, within a
	// second: each frame goes to one hook or the other, never lost.
	sub := c.dial(ch.SubscriberToken)
	two := startHook(t, nil)
	edited := b.mustCall("PATCH", "/channel/edit/"+ch.PublisherToken, `{"subscriber_message_hook_url": "`+two.url+`"}`, 200, nil)
	start := time.Now()
	ch.HookURL, ch.Listeners = ptr(two.url), 1
	if edited != channelBody(ch) {
		t.Errorf("edit on B: %s, want %s", edited, channelBody(ch))
	}
	for i := 0; ; i++ {
		sub.send(true, websocket.TextFrame, []byte(fmt.Sprint("frame ", i)))
		var r hookRequest
		select {
		case r = <-hook.requests:
			if time.Since(start) > time.Second {
				t.Fatalf("C still posts to the old hook URL %v after the edit", time.Since(start))
			}
			continue
		case r = <-two.requests:
		case <-time.After(waitTimeout):
			t.Fatal("frame reached no hook")
		}
		if r.body != fmt.Sprint("frame ", i) || r.header.Get("X-Gockets-Channel") != ch.SubscriberToken {
			t.Fatalf("hook got %q for %q", r.body, r.header.Get("X-Gockets-Channel"))
		}
		break
	}
	if time.Since(start) > time.Second {
		t.Errorf("the edit reached C after %v", time.Since(start))
	}

	// Published through A and B, the message reaches subscribers on every node.
	ws := a.subscribe(ch.SubscriberToken)
	ev := b.sse(ch.SubscriberToken, "")
	if r := b.publish(ch.PublisherToken, "hello"); r.Subscribers != 3 || r.Queued {
		t.Errorf("publish on B: %+v, want 3 subscribers", r)
	}
	sub.expectText("hello")
	if got := receive(t, ws); got != "hello" {
		t.Errorf("WebSocket on A got %q", got)
	}
	if got := ev.message(); got.data != "hello" {
		t.Errorf("SSE on B got %+v", got)
	}

	// The same errors as one node.
	for _, tc := range []struct {
		method, path, body string
		status             int
		answer             string
	}{
		{"GET", "/channel/nope", "", 404, `{"type":"ERR","message":"publisher token not found"}`},
		{"POST", "/channel/publish/nope", "x", 404, `{"type":"ERR","message":"publisher token not found"}`},
		{"PATCH", "/channel/edit/nope", "{}", 404, `{"type":"ERR","message":"publisher token not found"}`},
		{"DELETE", "/channel/publish/nope", "", 404, `{"type":"ERR","message":"publisher token not found"}`},
		{"GET", "/channel/subscribe/nope", "", 404, `{"type":"ERR","message":"subscriber token not found"}`},
		{"PATCH", "/channel/edit/" + ch.PublisherToken, `{"subscriber_message_hook_url": "file:///etc"}`, 400, `{"type":"ERR","message":"subscriber_message_hook_url: scheme \"file\" is not allowed, use http or https"}`},
		{"POST", "/channel/prepare", `{"tag": 5}`, 400, `{"type":"ERR","message":"tag must be a string or null"}`},
		{"POST", "/channel/publish/" + ch.PublisherToken, strings.Repeat("x", 2<<20), 413, `{"type":"ERR","message":"body is larger than 1048576 bytes"}`},
	} {
		if status, _, got := b.call(tc.method, tc.path, tc.body); status != tc.status || got != tc.answer+"\n" {
			t.Errorf("%s %s: %d %s, want %d %s", tc.method, tc.path, status, got, tc.status, tc.answer)
		}
	}
}

func TestRedisConcurrentPublishesArriveInOneOrder(t *testing.T) {
	rs := startRedis(t)
	a, b := startNode(t, rs.url()), startNode(t, rs.url())
	ch := a.prepare("")
	subs := []*wsClient{a.dial(ch.SubscriberToken), a.dial(ch.SubscriberToken), b.dial(ch.SubscriberToken), b.dial(ch.SubscriberToken)}
	const n = 200
	var wg sync.WaitGroup
	for _, d := range []*daemon{a, b} {
		wg.Go(func() {
			for i := range n {
				d.publish(ch.PublisherToken, fmt.Sprintf("%s %d", d.url, i))
			}
		})
	}
	var first []string
	for i, sub := range subs {
		var got []string
		next := map[string]int{a.url: 0, b.url: 0}
		for range 2 * n {
			_, p := sub.next()
			got = append(got, string(p))
			from, num, _ := strings.Cut(string(p), " ")
			if num != strconv.Itoa(next[from]) {
				t.Fatalf("subscriber %d got %q after %d messages from %s: out of order, lost or twice", i, p, next[from], from)
			}
			next[from]++
		}
		if i == 0 {
			first = got
		} else if !slices.Equal(got, first) {
			t.Fatalf("subscriber %d saw another order than subscriber 0", i)
		}
	}
	wg.Wait()
	for _, sub := range subs { // and nothing more
		sub.conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := sub.br.ReadByte(); !isTimeout(err) {
			t.Errorf("more than %d messages: %v", 2*n, err)
		}
	}
}

func TestRedisDeleteClosesSubscribersOnEveryNode(t *testing.T) {
	rs := startRedis(t)
	a, b := startNode(t, rs.url()), startNode(t, rs.url())
	ch := a.prepare("")
	ws := a.dial(ch.SubscriberToken)
	ev := b.sse(ch.SubscriberToken, "")
	b.mustCall("DELETE", "/channel/publish/"+ch.PublisherToken, "", 200, nil)
	if reason := ws.expectClose(1000); reason != "channel deleted" {
		t.Errorf("close reason %q", reason)
	}
	if got := ev.message(); got.event != "close" || got.data != `{"code":1000,"reason":"channel deleted"}` {
		t.Errorf("SSE on B: %+v", got)
	}
	for _, d := range []*daemon{a, b} {
		for _, call := range [][2]string{{"GET", "/channel/" + ch.PublisherToken}, {"POST", "/channel/publish/" + ch.PublisherToken},
			{"DELETE", "/channel/publish/" + ch.PublisherToken}, {"PATCH", "/channel/edit/" + ch.PublisherToken}} {
			if status, _, _ := d.call(call[0], call[1], ""); status != 404 {
				t.Errorf("%s %s on %s after delete: %d", call[0], call[1], d.url, status)
			}
		}
		if status, _, _ := d.call("GET", "/channel/subscribe/"+ch.SubscriberToken, ""); status != 404 {
			t.Errorf("subscribe on %s after delete: %d", d.url, status)
		}
	}
}

func TestRedisListenersCountEveryLiveNode(t *testing.T) {
	rs := startRedis(t)
	a := startNode(t, rs.url())
	b := startProcess(t, "-bind", "127.0.0.1", "-redis", rs.url())
	ch := a.prepare("")
	a.dial(ch.SubscriberToken)
	a.sse(ch.SubscriberToken, "")
	onB := b.sse(ch.SubscriberToken, "")
	// Joins are counted before the subscriber can see its stream: exact at once.
	for _, d := range []*daemon{a, b.daemon} {
		if n := d.listeners(ch.PublisherToken); n != 3 {
			t.Errorf("listeners on %s = %d, want 3", d.url, n)
		}
	}
	leaving := b.dial(ch.SubscriberToken)
	if n := a.listeners(ch.PublisherToken); n != 4 {
		t.Errorf("listeners = %d, want 4", n)
	}
	leaving.send(true, websocket.CloseFrame, closePayload(1000))
	leaving.expectClose(1000)
	start := time.Now()
	waitFor(t, "the count to drop", func() bool { return a.listeners(ch.PublisherToken) == 3 })
	if lag := time.Since(start); lag > 3*time.Second {
		t.Errorf("a leave took %v to count", lag)
	}

	// B dies without a word: its subscriber reconnects to A and resumes,
	// and B's count vanishes by itself.
	b.publish(ch.PublisherToken, "before")
	last := onB.message()
	if err := b.signal(syscall.SIGKILL); err == nil {
		t.Fatal("the node survived SIGKILL")
	}
	died := time.Now()
	a.publish(ch.PublisherToken, "while away")
	again := a.sse(ch.SubscriberToken, last.id)
	if got := again.message(); got.data != "while away" {
		t.Errorf("resumed on A with %+v", got)
	}
	// Its counts expire 10 s after its last refresh, which came before it
	// died: within 10 s of the kill, as the README says.
	deadline := died.Add(10*time.Second + 500*time.Millisecond)
	for a.listeners(ch.PublisherToken) != 3 {
		if time.Now().After(deadline) {
			t.Fatalf("listeners = %d 10 s after the node died, want 3", a.listeners(ch.PublisherToken))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("a dead node left the count after %v", time.Since(died).Round(100*time.Millisecond))
	var list struct{ Channels []channelJSON }
	a.mustCall("GET", "/channel", "", 200, &list)
	if len(list.Channels) != 1 || list.Channels[0].Listeners != 3 {
		t.Errorf("list: %+v", list)
	}
}

func TestRedisBacklogAndResumeAcrossNodes(t *testing.T) {
	rs := startRedis(t)
	a, b := startNode(t, rs.url()), startNode(t, rs.url())
	ch := a.prepare("")
	for i := range 3 {
		if r := a.publish(ch.PublisherToken, fmt.Sprint("early ", i)); !r.Queued || r.Subscribers != 0 {
			t.Fatalf("publish before any subscriber: %+v, want queued", r)
		}
	}
	first := b.dial(ch.SubscriberToken)
	for i := range 3 {
		first.expectText(fmt.Sprint("early ", i))
	}
	if r := a.publish(ch.PublisherToken, "live"); r.Queued || r.Subscribers != 1 {
		t.Errorf("publish with a subscriber: %+v", r)
	}
	first.expectText("live")
	// The next subscriber, on the other node, gets only what nobody had.
	second := a.sse(ch.SubscriberToken, "")
	b.publish(ch.PublisherToken, "for both")
	first.expectText("for both")
	seen := second.message()
	if seen.data != "for both" {
		t.Fatalf("second subscriber got %+v first", seen)
	}
	// Its stream breaks; it reconnects to B with Last-Event-ID and misses nothing.
	second.conn.Close()
	waitFor(t, "the SSE subscriber to leave", func() bool { return a.listeners(ch.PublisherToken) == 1 })
	a.publish(ch.PublisherToken, "missed 1")
	b.publish(ch.PublisherToken, "missed 2")
	first.expectText("missed 1")
	first.expectText("missed 2")
	resumed := b.sse(ch.SubscriberToken, seen.id)
	var ids []uint64
	for _, want := range []string{"missed 1", "missed 2"} {
		ev := resumed.message()
		if ev.data != want {
			t.Fatalf("resumed with %+v, want %q", ev, want)
		}
		id, _ := strconv.ParseUint(ev.id, 10, 64)
		ids = append(ids, id)
	}
	a.publish(ch.PublisherToken, "live again")
	ev := resumed.message()
	id, _ := strconv.ParseUint(ev.id, 10, 64)
	before, _ := strconv.ParseUint(seen.id, 10, 64)
	if ev.data != "live again" || !slices.IsSorted(append([]uint64{before}, append(ids, id)...)) || before == ids[0] {
		t.Errorf("after resuming: %+v; ids %d %v %d must grow", ev, before, ids, id)
	}
	first.expectText("live again")
}

func TestRedisRaceOfJoinAndPublishHandsEachMessageOnce(t *testing.T) {
	rs := startRedis(t)
	a, b := startNode(t, rs.url()), startNode(t, rs.url())
	// Rounds of: a publish through A while a subscriber joins on B. Whichever
	// Redis takes first, the subscriber gets the message once: kept and
	// handed over at the join, or delivered live.
	for round := range 20 {
		ch := a.prepare("")
		joined := make(chan *wsClient, 1)
		go func() {
			c, resp := dialWS(t, b.wsURL(ch.SubscriberToken), nil)
			if c == nil {
				t.Errorf("subscribe: %s", resp.Status)
			}
			joined <- c
		}()
		a.publish(ch.PublisherToken, fmt.Sprint("round ", round))
		c := recv(t, joined, "the subscriber")
		if c == nil {
			return
		}
		c.expectText(fmt.Sprint("round ", round))
		a.publish(ch.PublisherToken, "after")
		c.expectText("after") // not the round's message a second time
	}
}

func TestRedisOutagesAnswer503AndRecover(t *testing.T) {
	// With a password and a database other than 0: every reconnect must
	// send AUTH and SELECT again.
	rs := startRedis(t, "--appendonly", "yes", "--dir", t.TempDir(), "--requirepass", "pw")
	url := fmt.Sprintf("redis://:pw@127.0.0.1:%d/3", rs.port)
	a, b := startNode(t, url), startNode(t, url)
	ch := a.prepare(`{"tag": "kept"}`)
	sub := b.dial(ch.SubscriberToken)
	ev := a.sse(ch.SubscriberToken, "")
	a.publish(ch.PublisherToken, "before")
	sub.expectText("before")
	ev.message()

	// thawed: a publish that Redis had read when it froze is applied when
	// it thaws, though answered 503 (it may reach subscribers, never lost
	// while answered 200).
	outage := func(what string, thawed bool, begin, end func()) {
		t.Helper()
		begin()
		changes := []struct{ method, path, body string }{
			{"POST", "/channel/publish/" + ch.PublisherToken, "during"},
			{"POST", "/channel/prepare", ""},
			{"PATCH", "/channel/edit/" + ch.PublisherToken, `{"tag": "x"}`},
			{"DELETE", "/channel/publish/" + ch.PublisherToken, ""},
		}
		for _, c := range changes {
			start := time.Now()
			status, header, body := a.call(c.method, c.path, c.body)
			if took := time.Since(start); status != 503 || took > 2*time.Second || header.Get("Content-Type") != "application/json" || !strings.HasPrefix(body, `{"type":"ERR","message":"cannot reach Redis: `) {
				t.Errorf("%s: %s %s answered %d %s after %v, want 503 JSON within 2 s", what, c.method, c.path, status, body, took)
			}
		}
		for _, d := range []*daemon{a, b} {
			start := time.Now()
			waitFor(t, "/healthz to say 503", func() bool {
				status, _, _ := d.call("GET", "/healthz", "")
				return status == 503
			})
			if took := time.Since(start); took > 10*time.Second {
				t.Errorf("%s: /healthz said 503 after %v", what, took)
			}
		}
		end()
		for _, d := range []*daemon{a, b} {
			waitFor(t, "/healthz to say 200 again", func() bool {
				status, _, _ := d.call("GET", "/healthz", "")
				return status == 200
			})
		}
		// The subscribers that stayed connected receive again, from either node.
		for i, d := range []*daemon{a, b} {
			msg := what + " over, through " + d.url
			if r := d.publish(ch.PublisherToken, msg); r.Subscribers != 2 {
				t.Errorf("%s: publish after: %+v", what, r)
			}
			if _, p := sub.next(); i == 0 && thawed && string(p) == "during" {
				sub.expectText(msg)
			} else if string(p) != msg {
				t.Errorf("%s: WebSocket got %q, want %q", what, p, msg)
			}
			got := ev.message()
			if i == 0 && thawed && got.data == "during" {
				got = ev.message()
			}
			if got.data != msg {
				t.Errorf("%s: SSE got %+v, want %q", what, got, msg)
			}
		}
		if got := a.mustCall("GET", "/channel/"+ch.PublisherToken, "", 200, nil); !strings.Contains(got, `"tag":"kept"`) {
			t.Errorf("%s: the channel after: %s", what, got)
		}
	}
	outage("redis killed and restarted with its data", false, rs.kill, rs.start)
	outage("redis frozen", true, func() { rs.cmd.Process.Signal(syscall.SIGSTOP) }, func() {
		// Frozen, the Pub/Sub connection says nothing: its probe finds it dead.
		waitFor(t, "the Pub/Sub probe to notice", func() bool {
			return strings.Contains(b.logs.String(), "not even an answer to PING")
		})
		rs.cmd.Process.Signal(syscall.SIGCONT)
	})
}

// TestRedisReconnectBacksOffAsTheREADMESays: with Redis gone, both of a
// node's connections (commands and announcements) try again after 100 ms,
// doubling to 5 s, each wait ±50% at random. Each failed attempt is logged
// with the nominal wait ("in"); the time between two of those lines is the
// wait itself, as a refused connection on loopback fails at once.
func TestRedisReconnectBacksOffAsTheREADMESays(t *testing.T) {
	rs := startRedis(t)
	a := startNode(t, rs.url())
	a.prepare("")
	rs.kill()
	// The command connection finds Redis gone by itself (the announcements'
	// loss makes the node probe it) or with this request, which fails.
	if status, _, body := a.call("POST", "/channel/prepare", ""); status != 503 {
		t.Fatalf("prepare with Redis gone: %d %s", status, body)
	}
	want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond,
		800 * time.Millisecond, 1600 * time.Millisecond, 3200 * time.Millisecond, 5 * time.Second}
	line := regexp.MustCompile(`(?m)^time=(\S+) level=WARN msg="(redis connection lost; connecting again|redis announcements lost; subscribing again)" .* in=(\S+)$`)
	type attempt struct {
		at   time.Time
		wait time.Duration
	}
	attempts := func() map[string][]attempt {
		byLoop := map[string][]attempt{}
		for _, m := range line.FindAllStringSubmatch(a.logs.String(), -1) {
			at, err := time.Parse(time.RFC3339Nano, m[1])
			wait, err2 := time.ParseDuration(m[3])
			if err != nil || err2 != nil {
				t.Fatalf("log line time %q, in %q: %v %v", m[1], m[3], err, err2)
			}
			byLoop[m[2]] = append(byLoop[m[2]], attempt{at, wait})
		}
		return byLoop
	}
	// The waits before the 5 s one add up to 6.3 s, 9.45 s at most.
	deadline := time.Now().Add(15 * time.Second)
	for {
		byLoop := attempts()
		if len(byLoop) == 2 && len(byLoop["redis connection lost; connecting again"]) >= len(want) &&
			len(byLoop["redis announcements lost; subscribing again"]) >= len(want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 15 s, fewer than %d attempts of each connection: %v", len(want), byLoop)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Each wait is within ±50% of its nominal value (the log's times are in
	// milliseconds; a loaded machine may wake a little late), and they are
	// not all the nominal one.
	const late = 100 * time.Millisecond
	jittered := 0
	for loop, as := range attempts() {
		for i, w := range want {
			if as[i].wait != w {
				t.Errorf("%s: attempt %d logged in=%v, want %v", loop, i+1, as[i].wait, w)
			}
		}
		for i := range len(want) - 1 {
			took, nominal := as[i+1].at.Sub(as[i].at), as[i].wait
			if took < nominal/2-time.Millisecond || took > nominal*3/2+late {
				t.Errorf("%s: waited %v after in=%v, want %v to %v", loop, took, nominal, nominal/2, nominal*3/2)
			}
			if took < nominal*9/10 || took > nominal*11/10 {
				jittered++
			}
			t.Logf("%s: in=%v, waited %v", loop, nominal, took)
		}
	}
	// A wait within 10% of its nominal value is 1 in 5 at random: 12 in a
	// row are 1 in 244 million.
	if jittered == 0 {
		t.Errorf("every wait within 10%% of its nominal value: no jitter")
	}
}

func TestRedisLostAnnouncementsAreFilledFromTheStream(t *testing.T) {
	rs := startRedis(t)
	a, b := startNode(t, rs.url()), startNode(t, rs.url())
	ch := a.prepare("")
	sub := b.dial(ch.SubscriberToken)
	a.publish(ch.PublisherToken, "0")
	sub.expectText("0")
	for round := 1; round <= 3; round++ {
		// Every node's Pub/Sub connection is cut; what is published before
		// they subscribe again reaches the subscriber all the same, in order.
		rs.do("CLIENT", "KILL", "TYPE", "pubsub")
		for i := range 3 {
			a.publish(ch.PublisherToken, fmt.Sprint(round, ".", i))
		}
		for i := range 3 {
			sub.expectText(fmt.Sprint(round, ".", i))
		}
	}
	a.publish(ch.PublisherToken, "last")
	sub.expectText("last")
}

// TestRedisGapLongerThanTheStreamIsFilled: while a node's Pub/Sub
// connection is down, Redis takes more publishes than a stream keeps
// (streamMinLength): the node fills the whole gap from the stream once it
// is back, as nothing is trimmed while a node with subscribers of the
// channel does not follow the announcements. Redis runs the kill and the
// publishes in one go, before either node can subscribe again.
func TestRedisGapLongerThanTheStreamIsFilled(t *testing.T) {
	rs := startRedis(t)
	a, b := startNode(t, rs.url()), startNode(t, rs.url())
	ch := a.prepare("")
	subs := []*wsClient{a.dial(ch.SubscriberToken), b.dial(ch.SubscriberToken)}
	a.publish(ch.PublisherToken, "before")
	for _, sub := range subs {
		sub.expectText("before")
	}
	const n = 3 * streamMinLength
	burst := appendCommand(nil, "CLIENT", "KILL", "TYPE", "pubsub")
	for i := range n {
		burst = appendCommand(burst, "EVALSHA", publishScript.sha, 0, "gockets:", ch.PublisherToken, fmt.Sprint(i), "0", streamMinLength, 60000, streamAwayLength)
	}
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", rs.port), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(waitTimeout))
	if _, err := conn.Write(burst); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	if reply, err := readReply(br); err != nil || reply != int64(2) {
		t.Fatalf("CLIENT KILL TYPE pubsub answered %v, %v; want 2 (one per node)", reply, err)
	}
	for i := range n {
		if reply, err := readReply(br); err != nil || reply != int64(2) {
			t.Fatalf("publish %d answered %v, %v; want 2 subscribers", i, reply, err)
		}
	}
	a.publish(ch.PublisherToken, "after")
	for s, sub := range subs {
		for i := range n {
			if _, p := sub.next(); string(p) != fmt.Sprint(i) {
				t.Fatalf("subscriber %d got %q, want %q: the node lost the start of its gap", s, p, fmt.Sprint(i))
			}
		}
		sub.expectText("after")
	}
}

// TestRedisOutOfMemoryAnswers503JSON: a Redis at its maxmemory (with
// noeviction, Redis's default) refuses every write that takes memory: each
// change but delete and each subscribe, WebSocket or SSE, answers 503 JSON
// with Redis's reason, at once; reads go on, the subscribers already
// connected stay, and everything works again once Redis has memory.
func TestRedisOutOfMemoryAnswers503JSON(t *testing.T) {
	rs := startRedis(t)
	a, b := startNode(t, rs.url()), startNode(t, rs.url())
	ch := a.prepare("")
	sub := b.dial(ch.SubscriberToken)
	rs.do("CONFIG", "SET", "maxmemory", "1")
	const oom = `{"type":"ERR","message":"redis: OOM command not allowed when used memory \u003e 'maxmemory'.`
	check := func(what string, status int, header http.Header, body string, took time.Duration) {
		t.Helper()
		if status != 503 || header.Get("Content-Type") != "application/json" || !strings.HasPrefix(body, oom) || strings.Contains(body, "script") || took > 2*time.Second {
			t.Errorf("%s with Redis out of memory: %d %q %s after %v, want 503 JSON with Redis's reason", what, status, header.Get("Content-Type"), body, took)
		}
	}
	for _, c := range []struct{ method, path, body string }{
		{"POST", "/channel/prepare", ""},
		{"POST", "/channel/publish/" + ch.PublisherToken, "lost"},
		{"PATCH", "/channel/edit/" + ch.PublisherToken, `{"tag": "x"}`},
	} { // not delete: it frees memory, which Redis allows
		start := time.Now()
		status, header, body := a.call(c.method, c.path, c.body)
		check(c.method+" "+c.path, status, header, body, time.Since(start))
	}
	start := time.Now()
	if c, resp := dialWS(t, a.wsURL(ch.SubscriberToken), nil); c != nil {
		t.Error("a WebSocket subscribed while Redis could not count it")
	} else {
		body, _ := io.ReadAll(resp.Body)
		check("WebSocket subscribe", resp.StatusCode, resp.Header, string(body), time.Since(start))
	}
	req, _ := http.NewRequest("GET", b.url+"/channel/subscribe/"+ch.SubscriberToken, nil)
	req.Header.Set("Accept", "text/event-stream")
	start = time.Now()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	check("SSE subscribe", resp.StatusCode, resp.Header, string(body), time.Since(start))
	if n := b.listeners(ch.PublisherToken); n != 1 {
		t.Errorf("listeners = %d while Redis is out of memory, want 1", n)
	}

	rs.do("CONFIG", "SET", "maxmemory", "0")
	late := a.dial(ch.SubscriberToken)
	if r := a.publish(ch.PublisherToken, "after"); r.Subscribers != 2 {
		t.Errorf("publish once Redis has memory: %+v, want 2 subscribers", r)
	}
	sub.expectText("after")
	late.expectText("after")
}

// TestRedisCountRefusedByRedisIsWrittenAgain: a subscriber leaves while
// Redis is out of memory, which refuses the node's new count; once Redis
// has memory, the node writes its counts again by itself, within a
// presence round or two, rather than leave the old count until the next
// subscriber comes or goes.
func TestRedisCountRefusedByRedisIsWrittenAgain(t *testing.T) {
	rs := startRedis(t)
	a, b := startNode(t, rs.url()), startNode(t, rs.url())
	ch := a.prepare("")
	leaving := b.dial(ch.SubscriberToken)
	b.dial(ch.SubscriberToken)
	rs.do("CONFIG", "SET", "maxmemory", "1")
	leaving.send(true, websocket.CloseFrame, closePayload(closeNormal))
	leaving.expectClose(closeNormal)
	rs.do("CONFIG", "SET", "maxmemory", "0")
	back := time.Now()
	waitFor(t, "the count to be written again", func() bool { return a.listeners(ch.PublisherToken) == 1 })
	if took := time.Since(back); took > 3*presenceInterval {
		t.Errorf("listeners right %v after Redis had memory again, want within %v", took, 3*presenceInterval)
	}
}

// A burst of announcements that a node reads from Redis at once reaches a
// subscriber whole and in order, in a few writes rather than one per
// message: the subscriber's writer sends what the burst queued together.
func TestRedisBurstOfAnnouncementsGoesOutInFewWrites(t *testing.T) {
	rs := startRedis(t)
	p := startProcess(t, "-redis", rs.url())
	ch := p.prepare("")
	sub := p.dial(ch.SubscriberToken)
	p.publish(ch.PublisherToken, "first") // the node follows the channel now
	sub.expectText("first")
	// 50 publishes in one write to Redis: it runs them in one go and sends
	// their 50 announcements to the node in one write.
	const n = 50
	var burst []byte
	for i := range n {
		burst = appendCommand(burst, "EVALSHA", publishScript.sha, 0, "gockets:", ch.PublisherToken, fmt.Sprint(i), "0", 100, 60000, streamAwayLength)
	}
	writes := func() int {
		counts, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", p.cmd.Process.Pid))
		if err != nil {
			t.Fatalf("read the daemon's write count: %v", err)
		}
		_, rest, _ := strings.Cut(string(counts), "syscw: ")
		count, _, _ := strings.Cut(rest, "\n")
		w, err := strconv.Atoi(count)
		if err != nil {
			t.Fatalf("no write count in /proc/PID/io:\n%s", counts)
		}
		return w
	}
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", rs.port), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(waitTimeout))
	before := writes()
	if _, err := conn.Write(burst); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	for i := range n {
		if reply, err := readReply(br); err != nil || reply != int64(1) {
			t.Fatalf("publish %d through redis answered %v, %v; want 1 subscriber", i, reply, err)
		}
	}
	for i := range n {
		sub.expectText(fmt.Sprint(i))
	}
	// A node makes a few writes of its own meanwhile (a PING on its Pub/Sub
	// connection, its presence in Redis, each once a second).
	w := writes() - before
	t.Logf("%d writes for %d messages", w, n)
	if w > n/5 {
		t.Errorf("the daemon made %d writes for a burst of %d messages to one subscriber; want at most %d", w, n, n/5)
	}
}

func TestRedisOverTLS(t *testing.T) {
	rs, caFile := startRedisTLS(t)
	// Trusting the Redis server's CA with -redis-ca, two nodes share a
	// channel through rediss:// as through redis://.
	a, b := startNode(t, rs.url(), "-redis-ca", caFile), startNode(t, rs.url(), "-redis-ca", caFile)
	ch := a.prepare(`{"tag": "tls"}`)
	kept := a.publish(ch.PublisherToken, "kept")
	sub := b.dial(ch.SubscriberToken)
	sub.expectText("kept")
	if r := b.publish(ch.PublisherToken, "live"); r.Subscribers != 1 || r.Queued {
		t.Errorf("publish with a subscriber: %+v (before it: %+v)", r, kept)
	}
	sub.expectText("live")
	if got := rs.keys("gockets:sub:*"); len(got) != 1 {
		t.Errorf("keys in redis: %v", got)
	}
	// Without it, the system's CAs do not know the certificate: the node
	// does not connect, and says why.
	untrusted := startNode(t, rs.url())
	status, _, body := untrusted.call("GET", "/healthz", "")
	if status != 503 || !strings.Contains(body, "certificate signed by unknown authority") {
		t.Errorf("/healthz of a node that does not trust Redis's certificate: %d %s", status, body)
	}
	untrusted.mustCall("POST", "/channel/prepare", "", 503, nil)
}

// TestRedisJoinWhileAnnouncementsAreOnTheirWay: a subscriber joins a node
// whose subscribers have not yet been handed a message that Redis took
// (its announcement is still on the way). The node hands that message to
// the subscribers it had, not to the newcomer, and the announcement, when
// it arrives, to nobody.
func TestRedisJoinWhileAnnouncementsAreOnTheirWay(t *testing.T) {
	rs := startRedis(t)
	d := startNode(t, rs.url())
	ch := d.prepare("")
	first := d.dial(ch.SubscriberToken)
	d.publish(ch.PublisherToken, "before")
	first.expectText("before")

	// A publish as the engine makes it, whose announcement is held back:
	// the publish script with its PUBLISH turned into the script's answer.
	var held []string
	for line := range strings.Lines(publishScript.src) {
		if announcement, ok := strings.CutPrefix(line, "redis.call('PUBLISH', P .. 'events', "); ok {
			line = "do return " + strings.TrimSuffix(strings.TrimSpace(announcement), ")") + " end\n"
		}
		held = append(held, line)
	}
	reply := rs.do(append([]any{"EVAL", strings.Join(held, ""), 0}, "gockets:", ch.PublisherToken, "on its way", "0", 100, 60000, streamAwayLength)...)
	announcement, ok := reply.([]byte)
	if !ok || !strings.HasPrefix(string(announcement), "p "+ch.PublisherToken+" ") {
		t.Fatalf("held announcement: %q", reply)
	}

	// The second subscriber joins after that publish; its announcement
	// arrives after the join.
	second := d.dial(ch.SubscriberToken)
	rs.do("PUBLISH", "gockets:events", announcement)
	d.publish(ch.PublisherToken, "after")
	first.expectText("on its way")
	first.expectText("after")
	second.expectText("after") // not "on its way", published before it joined
}

func TestRedisWrongPasswordIsNamed(t *testing.T) {
	rs := startRedis(t, "--requirepass", "right")
	base := fmt.Sprintf("127.0.0.1:%d/0", rs.port)
	for _, u := range []string{"redis://:wrong@" + base, "redis://" + base, "redis://127.0.0.1:" + strconv.Itoa(rs.port) + "/2"} {
		// Without a password Redis answers the first command (PING, or
		// SELECT) with NOAUTH: as wrong as a wrong one.
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout/2) // should it start, it stops
		err := run(ctx, []string{"-bind", "127.0.0.1", "-port", "0", "-redis", u}, func(string) string { return "" }, io.Discard, io.Discard)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "redis refused the password") || exitStatus(err) == 0 {
			t.Errorf("%s: %v (exit %d), want the daemon not to start", u, err, exitStatus(err))
		}
	}
	for _, u := range []string{"redis://:right@" + base, "redis://default:right@" + base} {
		d := startNode(t, u)
		d.prepare("")
	}
}

// TestRedisPasswordChangedLaterIsNamed: Redis's password changes while a
// node runs, and its connections are cut: /healthz answers 503 naming the
// password, changes 503 JSON, the subscriber stays; once the password is
// the node's again, it comes back by itself and the subscriber receives.
func TestRedisPasswordChangedLaterIsNamed(t *testing.T) {
	rs := startRedis(t, "--requirepass", "pw")
	d := startNode(t, fmt.Sprintf("redis://:pw@127.0.0.1:%d/0", rs.port))
	ch := d.prepare("")
	sub := d.dial(ch.SubscriberToken)
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", rs.port), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(waitTimeout))
	br := bufio.NewReader(conn)
	admin := func(args ...any) {
		t.Helper()
		if _, err := conn.Write(appendCommand(nil, args...)); err != nil {
			t.Fatal(err)
		}
		if reply, err := readReply(br); err != nil {
			t.Fatalf("redis %v: %v", args, err)
		} else if e, ok := reply.(respError); ok {
			t.Fatalf("redis %v: %v", args, e)
		}
	}
	admin("AUTH", "pw")
	admin("CONFIG", "SET", "requirepass", "changed")
	admin("CLIENT", "KILL", "TYPE", "normal")
	admin("CLIENT", "KILL", "TYPE", "pubsub")
	start := time.Now()
	waitFor(t, "/healthz to name the password", func() bool {
		status, _, body := d.call("GET", "/healthz", "")
		return status == 503 && strings.Contains(body, "redis refused the password")
	})
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("/healthz named the password after %v", took)
	}
	start = time.Now()
	status, _, body := d.call("POST", "/channel/publish/"+ch.PublisherToken, "refused")
	if took := time.Since(start); status != 503 || !strings.HasPrefix(body, `{"type":"ERR","message":"cannot reach Redis: redis refused the password`) || took > 2*time.Second {
		t.Errorf("publish with the password changed: %d %s after %v", status, body, took)
	}
	admin("CONFIG", "SET", "requirepass", "pw")
	waitFor(t, "/healthz to say 200 again", func() bool {
		status, _, _ := d.call("GET", "/healthz", "")
		return status == 200
	})
	if r := d.publish(ch.PublisherToken, "back"); r.Subscribers != 1 {
		t.Errorf("publish once the password is back: %+v", r)
	}
	sub.expectText("back")
}

func TestRedisPrefixKeepsDeploymentsApart(t *testing.T) {
	rs := startRedis(t)
	a := startNode(t, rs.url())
	b := startNode(t, rs.url(), "-redis-prefix", "other:")
	ch := a.prepare("")
	sub := a.dial(ch.SubscriberToken)
	otherCh := b.prepare("")
	otherSub := b.dial(otherCh.SubscriberToken)
	if status, _, _ := b.call("GET", "/channel/"+ch.PublisherToken, ""); status != 404 {
		t.Errorf("B sees A's channel: %d", status)
	}
	otherCh.Listeners = 1
	if got := b.mustCall("GET", "/channel", "", 200, nil); got != `{"channels":[`+strings.TrimSuffix(channelBody(otherCh), "\n")+"]}\n" {
		t.Errorf("B lists %s", got)
	}
	if status, _, _ := b.call("GET", "/channel/subscribe/"+ch.SubscriberToken, ""); status != 404 {
		t.Errorf("B subscribes to A's channel: %d", status)
	}
	a.publish(ch.PublisherToken, "for A")
	b.publish(otherCh.PublisherToken, "for B")
	sub.expectText("for A")
	otherSub.expectText("for B")
	for _, k := range rs.keys("*") {
		if !strings.HasPrefix(k, "gockets:") && !strings.HasPrefix(k, "other:") {
			t.Errorf("key %q outside both prefixes", k)
		}
	}
}

func TestRedisMemoryStaysBounded(t *testing.T) {
	rs := startRedis(t)
	a := startNode(t, rs.url(), "-backlog", "10")
	ch := a.prepare(`{"tag": "t"}`)
	sub := a.dial(ch.SubscriberToken)
	keysBefore := rs.keys("*")
	for i := range 2000 {
		a.publish(ch.PublisherToken, fmt.Sprint("m", i))
	}
	for i := range 2000 {
		sub.expectText(fmt.Sprint("m", i))
	}
	log := "gockets:log:" + ch.PublisherToken
	if n := rs.do("XLEN", log).(int64); n > 2*streamMinLength {
		t.Errorf("stream holds %d messages after 2000 publishes, want at most %d", n, 2*streamMinLength)
	}
	if ttl := rs.do("PTTL", log).(int64); ttl <= 0 || ttl > streamMinTTL.Milliseconds() {
		t.Errorf("stream TTL %d ms", ttl)
	}
	if got := rs.keys("*"); !slices.Equal(got, slices.Sorted(slices.Values(append(keysBefore, log)))) {
		t.Errorf("keys after 2000 publishes: %v, before: %v", got, keysBefore)
	}
	a.mustCall("DELETE", "/channel/publish/"+ch.PublisherToken, "", 200, nil)
	sub.expectClose(1000)
	for _, k := range rs.keys("*") {
		if k != "gockets:seq" && k != "gockets:nodes" && !strings.HasPrefix(k, "gockets:node:") {
			t.Errorf("key %q left after the channel was deleted", k)
		}
	}
	waitFor(t, "the node's counts to empty", func() bool {
		for _, k := range rs.keys("gockets:node:*") {
			if rs.do("HLEN", k).(int64) != 0 {
				return false
			}
		}
		return true
	})
}

// While a node with subscribers of a channel does not follow the
// announcements, the channel's stream keeps what it misses, but no more
// than streamAwayLength: a node that never comes back (its presence alive,
// its Pub/Sub connection not) must not make Redis grow with every publish.
func TestRedisStreamWhileANodeIsAwayIsBounded(t *testing.T) {
	rs := startRedis(t)
	d := startNode(t, rs.url())
	ch := d.prepare("")
	// A node that counts a subscriber of the channel and follows nothing.
	rs.do("ZADD", "gockets:nodes", time.Now().Add(time.Hour).UnixMilli(), "away")
	rs.do("HSET", "gockets:node:away", ch.PublisherToken, 1)
	const n = streamAwayLength + 2000
	var burst []byte
	for i := range n {
		burst = appendCommand(burst, "EVALSHA", publishScript.sha, 0, "gockets:", ch.PublisherToken, fmt.Sprint(i), "0", streamMinLength, 60000, streamAwayLength)
	}
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", rs.port), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(waitTimeout))
	go conn.Write(burst) // Redis answers as it reads: read meanwhile
	br := bufio.NewReader(conn)
	for i := range n {
		if reply, err := readReply(br); err != nil || reply != int64(1) {
			t.Fatalf("publish %d through redis answered %v, %v; want 1 subscriber", i, reply, err)
		}
	}
	// MAXLEN ~ trims whole nodes of the stream (100 entries each).
	if got := rs.do("XLEN", "gockets:log:"+ch.PublisherToken).(int64); got <= 2*streamMinLength || got > streamAwayLength+200 {
		t.Errorf("stream holds %d messages after %d publishes while a node was away, want %d (more than %d)", got, n, streamAwayLength, 2*streamMinLength)
	}
}

// A join whose answer is lost (the connection to Redis breaks after Redis
// read it) may have taken what waited in the backlog: the node reads the
// join's receipt once Redis answers again and gives it back, so the next
// subscriber gets it rather than nobody.
func TestRedisJoinWhoseAnswerIsLostGivesTheBacklogBack(t *testing.T) {
	rs := startRedis(t)
	// Between the node and Redis: a proxy that, once armed, passes on the
	// next join and then cuts both ends, before Redis can answer.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var armed atomic.Bool
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", rs.port))
			if err != nil {
				c.Close()
				continue
			}
			t.Cleanup(func() { c.Close(); up.Close() })
			var cut atomic.Bool // set before the join goes: its answer never comes back
			go func() {
				buf := make([]byte, 64<<10)
				for {
					n, err := up.Read(buf)
					if err != nil || cut.Load() {
						c.Close()
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
			go func() {
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					if err != nil {
						up.Close()
						return
					}
					join := bytes.Contains(buf[:n], []byte(joinScript.sha)) && armed.CompareAndSwap(true, false)
					if join {
						cut.Store(true)
					}
					if _, err := up.Write(buf[:n]); err != nil || join {
						up.Close()
						c.Close()
						return
					}
				}
			}()
		}
	}()
	d := startNode(t, "redis://"+ln.Addr().String()+"/0")
	ch := d.prepare("")
	for i := range 3 {
		if r := d.publish(ch.PublisherToken, fmt.Sprint("kept ", i)); !r.Queued {
			t.Fatalf("publish without a subscriber: %+v, want queued", r)
		}
	}
	armed.Store(true)
	req, _ := http.NewRequest("GET", d.url+"/channel/subscribe/"+ch.SubscriberToken, nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := (&http.Client{Timeout: waitTimeout}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 503 || armed.Load() {
		t.Fatalf("subscribe whose join lost its answer: %s (cut: %v), want 503", resp.Status, !armed.Load())
	}
	waitFor(t, "the node to settle the lost join", func() bool { return len(rs.keys("gockets:join:*")) == 0 })
	sub := d.dial(ch.SubscriberToken)
	for i := range 3 {
		sub.expectText(fmt.Sprint("kept ", i))
	}
}

// takenPort is a port of 127.0.0.1 that a listener of the test holds.
func takenPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// clients is how many connections Redis has, the one asking included.
func (rs *redisServer) clients() int {
	rs.t.Helper()
	return strings.Count(string(rs.do("CLIENT", "LIST").([]byte)), "\n")
}

func TestRedisListenFailureLeavesNoConnection(t *testing.T) {
	rs := startRedis(t)
	err := run(context.Background(), []string{"-bind", "127.0.0.1", "-port", takenPort(t), "-redis", rs.url()},
		func(string) string { return "" }, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "listen: ") || exitStatus(err) != 1 {
		t.Fatalf("run on a taken port: %v (exit %d)", err, exitStatus(err))
	}
	// run has returned: the connection it made is closed already, and
	// Redis sees that at once (well before a garbage collection might).
	deadline := time.Now().Add(time.Second)
	for n := rs.clients(); n != 1; n = rs.clients() {
		if time.Now().After(deadline) {
			t.Fatalf("Redis has %d connections after run returned, want 1 (this one)", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// monitor returns the commands Redis runs while during runs, Lua's
// included, as MONITOR shows them: one line each, the command in quotes.
func (rs *redisServer) monitor(during func()) []string {
	rs.t.Helper()
	conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", rs.port), time.Second)
	if err != nil {
		rs.t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	if _, err := conn.Write(appendCommand(nil, "MONITOR")); err != nil {
		rs.t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(waitTimeout))
	if reply, err := readReply(br); err != nil || replyString(reply) != "OK" {
		rs.t.Fatalf("MONITOR: %v %v", reply, err)
	}
	during()
	const end = "end of the monitored commands"
	rs.do("ECHO", end) // Redis shows it after everything during ran
	var lines []string
	conn.SetReadDeadline(time.Now().Add(waitTimeout))
	for {
		reply, err := readReply(br)
		if err != nil {
			rs.t.Fatalf("MONITOR: %v", err)
		}
		line := replyString(reply)
		if strings.HasSuffix(line, `"ECHO" "`+end+`"`) {
			return lines
		}
		lines = append(lines, line)
	}
}

func TestRedisIdleNodeWritesNothing(t *testing.T) {
	rs := startRedis(t)
	a := startNode(t, rs.url())
	ch := a.prepare("")
	sub := a.dial(ch.SubscriberToken)
	sub.send(true, websocket.CloseFrame, closePayload(1000))
	sub.expectClose(1000)
	waitFor(t, "the count to drop", func() bool { return a.listeners(ch.PublisherToken) == 0 })
	// A node with no subscriber left has nothing to keep alive in Redis:
	// over several presence rounds it only probes its Pub/Sub connection.
	for _, line := range rs.monitor(func() { time.Sleep(3*presenceInterval + presenceInterval/2) }) {
		if !strings.HasSuffix(line, ` "PING"`) {
			t.Errorf("an idle node ran %s", line)
		}
	}
	if keys := rs.keys("gockets:node:*"); len(keys) != 0 {
		t.Errorf("an idle node left %q", keys)
	}
}

// TestRedisIdleNodeFindsRedisBackByItself: a node with no subscriber sends
// no command while Redis is away, yet once its /healthz says 200 again its
// very next change is served, not answered 503 by a connection Redis
// closed when it went.
func TestRedisIdleNodeFindsRedisBackByItself(t *testing.T) {
	rs := startRedis(t)
	a := startNode(t, rs.url())
	a.prepare("")
	health := func() int {
		status, _, _ := a.call("GET", "/healthz", "")
		return status
	}
	rs.kill()
	waitFor(t, "/healthz to say 503", func() bool { return health() == 503 })
	rs.start()
	waitFor(t, "/healthz to say 200 again", func() bool { return health() == 200 })
	if status, _, body := a.call("POST", "/channel/prepare", ""); status != 200 {
		t.Errorf("the first prepare once Redis is back: %d %s", status, body)
	}
}

// TestRedisIdleCommandConnectionClosedByRedis: Redis closes a command
// connection that sent nothing for its timeout (here 1 s; Pub/Sub ones it
// keeps). An idle node notices at once and connects again by itself:
// once its /healthz says 200, its next change is served, not answered 503
// by the connection Redis closed.
func TestRedisIdleCommandConnectionClosedByRedis(t *testing.T) {
	rs := startRedis(t, "--timeout", "1")
	a := startNode(t, rs.url())
	a.prepare("")
	commandConnections := func() []string {
		var ids []string
		for line := range strings.Lines(string(rs.do("CLIENT", "LIST").([]byte))) {
			if strings.Contains(line, " flags=N ") && !strings.Contains(line, " cmd=client|list") {
				id, _, _ := strings.Cut(line, " ")
				ids = append(ids, id)
			}
		}
		return ids
	}
	first := commandConnections()
	if len(first) != 1 {
		t.Fatalf("the node has %d command connections, want 1: %v", len(first), first)
	}
	waitFor(t, "Redis to close the idle command connection", func() bool {
		return !slices.Contains(commandConnections(), first[0])
	})
	waitFor(t, "/healthz to say 200", func() bool {
		status, _, _ := a.call("GET", "/healthz", "")
		return status == 200
	})
	if status, _, body := a.call("POST", "/channel/prepare", ""); status != 200 {
		t.Errorf("the first prepare after Redis closed the idle connection: %d %s", status, body)
	}
}

// TestRedisJoinForgetsDeadNodes: nodes killed with -9 while no node had a
// subscriber to refresh its presence with leave their entries in P:nodes;
// the next join anywhere removes them, so the set does not grow with the
// nodes that came and went.
// A join reads at most joinReadBytes of kept messages from Redis (one,
// however big): an event stream that resumes from an old id, again and
// again, must not make Redis read the whole stream each time. What a join
// did not reach waits for the next subscriber.
func TestRedisJoinReadsAMebibyteAtMost(t *testing.T) {
	rs := startRedis(t)
	d := startNode(t, rs.url())
	ch := d.prepare("")
	big := func(i int) string { return fmt.Sprintf("m%d ", i) + strings.Repeat("x", 300<<10) }
	short := func(s string) string { return s[:min(len(s), 8)] }
	expect := func(c *wsClient, want string) {
		t.Helper()
		if op, p := c.next(); op != websocket.TextFrame || string(p) != want {
			t.Fatalf("got frame %d %q (%d bytes), want %q", op, short(string(p)), len(p), short(want))
		}
	}
	for i := range 6 {
		if r := d.publish(ch.PublisherToken, big(i)); !r.Queued {
			t.Fatalf("publish %d without a subscriber: %+v, want queued", i, r)
		}
	}
	// The first subscriber gets the newest three, 900 KiB; the fourth
	// would pass 1 MiB.
	first := d.dial(ch.SubscriberToken)
	for i := 3; i < 6; i++ {
		expect(first, big(i))
	}
	d.publish(ch.PublisherToken, "live")
	expect(first, "live")
	// The three it did not reach waited for the next one.
	second := d.dial(ch.SubscriberToken)
	for i := range 3 {
		expect(second, big(i))
	}
	d.publish(ch.PublisherToken, "live 2")
	expect(first, "live 2")
	expect(second, "live 2")
	// A resume from before them all gets the newest that fit, not all eight.
	resumed := d.sse(ch.SubscriberToken, "1")
	for _, want := range []string{big(3), big(4), big(5), "live", "live 2"} {
		if ev := resumed.message(); ev.data != want {
			t.Fatalf("resumed from id 1: got %q (%d bytes), want %q", short(ev.data), len(ev.data), short(want))
		}
	}
}

func TestRedisJoinForgetsDeadNodes(t *testing.T) {
	rs := startRedis(t)
	a := startNode(t, rs.url())
	ch := a.prepare("")
	past := time.Now().Add(-2 * nodeTTL).UnixMilli()
	for i := range 100 { // each expired more than a node's TTL ago
		rs.do("ZADD", "gockets:nodes", past-int64(i), fmt.Sprint("dead-", i))
	}
	a.dial(ch.SubscriberToken) // joined when the upgrade is answered
	if n := rs.do("ZCARD", "gockets:nodes"); n != int64(1) {
		t.Errorf("after a join P:nodes holds %v nodes, want 1 (the live one)", n)
	}
}

func TestRedisListReadsAPageAtATime(t *testing.T) {
	rs := startRedis(t)
	a, b := startNode(t, rs.url()), startNode(t, rs.url())
	const n = 2*redisListPage + redisListPage/2
	var all, tagged []string
	for i := range n {
		body := ""
		if i%3 == 0 {
			body = fmt.Sprintf(`{"tag": "room-%d"}`, i)
		}
		ch := a.prepare(body)
		if i == n-1 { // counted on every node alike
			b.dial(ch.SubscriberToken)
			ch.Listeners = 1
		}
		all = append(all, strings.TrimSuffix(channelBody(ch), "\n"))
		if ch.Tag != nil {
			tagged = append(tagged, strings.TrimSuffix(channelBody(ch), "\n"))
		}
	}
	deleted := a.prepare("")
	a.mustCall("DELETE", "/channel/publish/"+deleted.PublisherToken, "", 200, nil)
	want := `{"channels":[` + strings.Join(all, ",") + "]}\n"
	wantTagged := `{"channels":[` + strings.Join(tagged, ",") + "]}\n"
	lines := rs.monitor(func() {
		for _, d := range []*daemon{a, b} {
			if got := d.mustCall("GET", "/channel", "", 200, nil); got != want {
				t.Errorf("list on %s:\n got %s\nwant %s", d.url, got, want)
			}
			if got := d.mustCall("GET", "/channel/show?search=^room-", "", 200, nil); got != wantTagged {
				t.Errorf("search on %s:\n got %s\nwant %s", d.url, got, wantTagged)
			}
		}
	})
	// Each call of the list script reads at most a page: each of the 4
	// lists of 250 channels takes 3 calls.
	calls, views := 0, 0
	for _, line := range lines {
		switch {
		case strings.Contains(line, `"EVALSHA" "`+listScript.sha+`"`):
			calls++
			views = 0
		case strings.Contains(line, `"HMGET"`):
			if views++; views > redisListPage {
				t.Fatalf("a call of the list script read more than %d channels", redisListPage)
			}
		}
	}
	if calls != 4*3 {
		t.Errorf("4 lists took %d calls of the list script, want 12", calls)
	}
}

// TestRedisJoinThatCannotQueueWhatItTookIsSlow: a message the join took
// from Redis (marked handed there) and could not queue would be lost to the
// subscriber in silence; it is closed as too slow instead, as when a
// publish finds its queue full.
func TestRedisJoinThatCannotQueueWhatItTookIsSlow(t *testing.T) {
	rs := startRedis(t)
	d := startDaemonWith(t, nil, "-redis", rs.url(), "-log-level", "2")
	ch := d.prepare("")
	for i := range 3 {
		d.publish(ch.PublisherToken, fmt.Sprint("early ", i))
	}
	c := d.channelOf(ch.SubscriberToken)
	s := d.hub.newSubscriber(c, "websocket")
	s.queue = make([]*message, d.hub.cfg.sendQueue-1) // room for one of the three
	if err := d.hub.engine.join(c, s, false, 0); err != nil {
		t.Fatalf("join refused: %v", err)
	}
	s.mu.Lock()
	bye := s.bye
	s.mu.Unlock()
	if bye.code != closePolicyViolation || d.hub.stats.slowDisconnects.Load() != 1 {
		t.Errorf("farewell %+v, %d slow disconnects; want 1008 and 1", bye, d.hub.stats.slowDisconnects.Load())
	}
	if n := d.listeners(ch.PublisherToken); n != 0 {
		t.Errorf("listeners %d", n)
	}
}

func TestRedisFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-redis", "redis://127.0.0.1:1/0", "-state-file", "x"}, "-redis and -state-file do not go together: with Redis, Redis is the store now"},
		{[]string{"-redis", "http://127.0.0.1/0"}, `-redis: scheme "http": use redis:// or rediss://`},
		{[]string{"-redis", "redis://127.0.0.1/zero"}, `-redis: database "zero" is not a number`},
		{[]string{"-redis", "redis:///0"}, "-redis: no host"},
		{[]string{"-redis", "redis://127.0.0.1", "-channel-ttl", "1h"}, "-channel-ttl is not available with -redis yet"},
		{[]string{"-redis", "redis://127.0.0.1", "-redis-ca", "ca.pem"}, "-redis-ca is for a rediss:// URL in -redis"},
		{[]string{"-redis", "rediss://127.0.0.1", "-redis-ca", "/nonexistent/ca.pem"}, "-redis-ca: open /nonexistent/ca.pem"},
		{[]string{"-redis", "rediss://127.0.0.1", "-redis-ca", "main.go"}, "-redis-ca: no PEM certificate in main.go"},
	} {
		_, err := parseConfig(tc.args, func(string) string { return "" }, io.Discard)
		if err == nil || !strings.Contains(err.Error(), tc.want) || exitStatus(err) != 2 {
			t.Errorf("%q: %v, want exit 2 with %q", tc.args, err, tc.want)
		}
	}
	for raw, want := range map[string]redisOptions{
		"redis://127.0.0.1":                  {addr: "127.0.0.1:6379", host: "127.0.0.1"},
		"rediss://u:p%40ss@redis.lan:7000/3": {addr: "redis.lan:7000", host: "redis.lan", tls: true, user: "u", password: "p@ss", db: 3},
		"redis://:secret@[::1]:6380/0":       {addr: "[::1]:6380", host: "::1", password: "secret"},
	} {
		got, err := parseRedisURL(raw)
		if err != nil || *got != want {
			t.Errorf("%s: %+v %v, want %+v", raw, got, err, want)
		}
	}
}

// TestRedisCommandsAreNotMixedAfterABigOne sends a small command, one over
// the size whose buffer is kept, then many concurrent ones: each must reach
// Redis whole, none written over by another.
func TestRedisCommandsAreNotMixedAfterABigOne(t *testing.T) {
	ours, theirs := net.Pipe()
	rc := &redisConn{Conn: ours, br: bufio.NewReader(ours)}
	c := &redisClient{log: slog.New(slog.DiscardHandler), conn: rc, up: make(chan struct{})}
	var sent bytes.Buffer
	copied := make(chan error, 1)
	go func() {
		_, err := io.Copy(&sent, theirs)
		copied <- err
	}()
	c.send(true, "SMALL", strings.Repeat("s", 4000))
	c.send(true, "BIG", strings.Repeat("b", 70<<10))
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Go(func() { c.send(true, "SET", "k", strings.Repeat(string(rune('a'+i%26)), 100)) })
	}
	wg.Wait()
	ours.Close()
	if err := recv(t, copied, "the commands to be read"); err != nil {
		t.Fatalf("read the commands: %v", err)
	}
	r := bufio.NewReader(&sent)
	for n := 0; ; n++ {
		v, err := readReply(r)
		if err == io.EOF {
			if n != 202 {
				t.Errorf("%d commands reached Redis, want 202", n)
			}
			return
		}
		if err != nil {
			t.Fatalf("command %d: %v", n, err)
		}
		args, ok := v.([]any)
		if !ok || len(args) < 2 {
			t.Fatalf("command %d: %#v", n, v)
		}
		value := args[len(args)-1].([]byte)
		if strings.Trim(string(value), string(value[:1])) != "" {
			t.Fatalf("command %d (%s) mixed with another: %.60q", n, args[0], value)
		}
	}
}

// TestRedisFailedUpgradeGivesTheBacklogBackToAnyNode: a join that could
// take only the oldest of what waited (its queue is short) and whose
// upgrade then failed gives them back in their place, before the rest,
// and the next subscriber, on another node, gets them all in order, once.
func TestRedisFailedUpgradeGivesTheBacklogBackToAnyNode(t *testing.T) {
	rs := startRedis(t)
	a := startDaemonWith(t, func(c *config) { c.sendQueue = 2 }, "-redis", rs.url())
	b := startNode(t, rs.url())
	ch := a.prepare("")
	for i := range 4 {
		a.publish(ch.PublisherToken, fmt.Sprintf("kept %d", i+1))
	}
	c := a.channelOf(ch.SubscriberToken)
	s := a.hub.newSubscriber(c, "websocket")
	if err := a.hub.engine.join(c, s, false, 0); err != nil {
		t.Fatalf("join refused: %v", err)
	}
	s.mu.Lock()
	took := len(s.queue)
	s.mu.Unlock()
	if took != 2 {
		t.Fatalf("the join took %d messages, want the 2 its queue holds", took)
	}
	a.hub.engine.unjoin(c, s)
	sub := b.dial(ch.SubscriberToken)
	for i := range 4 {
		sub.expectText(fmt.Sprintf("kept %d", i+1))
	}
	a.publish(ch.PublisherToken, "live")
	sub.expectText("live")
}

// TestRedisJoinRefusedAtShutdownGivesTheBacklogBack: a WebSocket join
// that Redis has answered, handing over what waited, is refused here when
// the node began shutting down meanwhile (the upgrade then fails with no
// unjoin): what it took waits again for the next subscriber, on any node.
func TestRedisJoinRefusedAtShutdownGivesTheBacklogBack(t *testing.T) {
	rs := startRedis(t)
	a := startDaemon(t, "-redis", rs.url())
	b := startNode(t, rs.url())
	ch := a.prepare("")
	a.publish(ch.PublisherToken, "kept 1")
	a.publish(ch.PublisherToken, "kept 2")
	c := a.channelOf(ch.SubscriberToken)
	a.hub.closing.Store(true) // what closeAll sets first, while this join was on its way to Redis
	if err := a.hub.engine.join(c, a.hub.newSubscriber(c, "websocket"), false, 0); !errors.Is(err, errShuttingDown) {
		t.Fatalf("join while shutting down: %v, want %v", err, errShuttingDown)
	}
	sub := b.dial(ch.SubscriberToken)
	b.publish(ch.PublisherToken, "live")
	sub.expectText("kept 1")
	sub.expectText("kept 2")
	sub.expectText("live")
}

// TestRedisWriteThatWaitsHoldsNoLock: while the command connection cannot
// take a byte more (Redis frozen, the socket's buffer full), subscribers
// still leave at once: each count they change is queued in their
// channel's order and written later, with no channel's lock held while
// the write waits. Both disconnect events reach the hook before the
// waiting write fails, as neither leave waits for it.
func TestRedisWriteThatWaitsHoldsNoLock(t *testing.T) {
	rs := startRedis(t)
	hook := startHook(t, nil)
	d := startDaemon(t, "-redis", rs.url(), "-hook-events")
	t.Cleanup(func() { rs.cmd.Process.Signal(syscall.SIGCONT) }) // before the daemon stops
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))
	a, b := d.dial(ch.SubscriberToken), d.dial(ch.SubscriberToken)
	for range 2 {
		recv(t, hook.requests, "connect event")
	}
	cmd := d.hub.engine.(*redisEngine).cmd
	connection := func() *redisConn {
		cmd.mu.Lock()
		defer cmd.mu.Unlock()
		return cmd.conn
	}
	stuck := connection()
	if stuck == nil {
		t.Fatal("no command connection to Redis")
	}
	if err := rs.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	fillSocket(t, stuck.Conn)
	a.conn.Close()
	b.conn.Close()
	for range 2 {
		r := recv(t, hook.requests, "disconnect event")
		if event := r.header.Get("X-Gockets-Event"); event != "disconnect" {
			t.Fatalf("the hook got %q %q, want a disconnect event", event, r.body)
		}
		if connection() != stuck {
			t.Fatal("a disconnect reached the hook only once the write that waited for Redis had failed")
		}
	}
}

// fillSocket writes to conn, never waiting, until the kernel takes no
// more: what a Redis that stopped reading leaves after the writes it did
// take. The bytes begin a bulk string longer than Redis accepts, so that
// Redis, once it reads them, closes the connection rather than run them.
func fillSocket(t *testing.T, conn net.Conn) {
	t.Helper()
	raw, err := conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	copy(chunk, "*1\r\n$1000000000000\r\n")
	written, full := 0, false
	var werr error
	err = raw.Write(func(fd uintptr) bool {
		for written < 1<<30 {
			n, err := syscall.Write(int(fd), chunk)
			if err == syscall.EAGAIN {
				full = true
				return true
			}
			if err != nil {
				werr = err
				return true
			}
			written += n
			clear(chunk[:min(n, 32)])
		}
		return true
	})
	if err = cmp.Or(err, werr); err != nil || !full {
		t.Fatalf("filling the socket: %d bytes written, full %v, %v", written, full, err)
	}
}

// FuzzRESP: the reply parser never panics, never claims more than it read,
// and what it parses encodes back to the same bytes.
func FuzzRESP(f *testing.F) {
	for _, seed := range []string{
		"+OK\r\n", "-ERR wrong\r\n", ":42\r\n", ":-1\r\n", "$5\r\nhello\r\n", "$0\r\n\r\n", "$-1\r\n", "*-1\r\n",
		"*3\r\n$7\r\nmessage\r\n$3\r\nabc\r\n$5\r\np x 1\r\n", "*2\r\n$4\r\npong\r\n$0\r\n\r\n",
		"*2\r\n$15\r\n1700000000000-0\r\n*4\r\n$1\r\nd\r\n$2\r\nhi\r\n$1\r\nb\r\n$1\r\n0\r\n",
		"$2147483647\r\n", "*16777217\r\n", "*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n", "$3\r\nabcde", ":1\n", "x\r\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bufio.NewReaderSize(bytes.NewReader(data), respMaxLine)
		reply, err := readReply(r)
		if err != nil {
			return
		}
		used := len(data) - r.Buffered()
		if got := encodeReply(nil, reply); !bytes.Equal(got, normalizeRESP(data[:used])) {
			t.Fatalf("%q parsed as %#v, which encodes as %q", data[:used], reply, got)
		}
	})
}

// encodeReply is RESP2 as Redis writes it.
func encodeReply(b []byte, v any) []byte {
	switch v := v.(type) {
	case nil:
		return append(b, "$-1\r\n"...)
	case string:
		return append(append(append(b, '+'), v...), "\r\n"...)
	case respError:
		return append(append(append(b, '-'), v...), "\r\n"...)
	case int64:
		return append(strconv.AppendInt(append(b, ':'), v, 10), "\r\n"...)
	case []byte:
		b = append(strconv.AppendInt(append(b, '$'), int64(len(v)), 10), "\r\n"...)
		return append(append(b, v...), "\r\n"...)
	case []any:
		b = append(strconv.AppendInt(append(b, '*'), int64(len(v)), 10), "\r\n"...)
		for _, item := range v {
			b = encodeReply(b, item)
		}
		return b
	}
	panic(fmt.Sprintf("reply of type %T", v))
}

// normalizeRESP writes the lengths and integers of valid RESP as Redis
// would ("*-1" is a nil like "$-1", ":+1" is ":1"), for the comparison.
func normalizeRESP(data []byte) []byte {
	reply, err := readReply(bufio.NewReaderSize(bytes.NewReader(data), respMaxLine))
	if err != nil {
		return nil
	}
	return encodeReply(nil, reply)
}

// The Redis engine passes the behaviour tests of the in-memory one: the same
// tests, run again with -redis.
func TestRedisPassesTheOneNodeTests(t *testing.T) {
	rs := startRedis(t)
	defer func() { engineArgs = nil }()
	// Not here: tests that reach into the hub (its stats, its channels) or
	// that check what differs by design: SSE ids (Redis's grow, but not by
	// one), the backlog's drop counters (Redis trims and expires them).
	for i, test := range []struct {
		name string
		run  func(*testing.T)
	}{
		{"RoutesAnswerTheContract", TestRoutesAnswerTheContract},
		{"EditKeepsWhatItIsNotGiven", TestEditKeepsWhatItIsNotGiven},
		{"SearchFiltersByTag", TestSearchFiltersByTag},
		{"UnknownRoutesAndMethodsAnswerJSON", TestUnknownRoutesAndMethodsAnswerJSON},
		{"BroadcastReachesEverySubscriberInOrderOnce", TestBroadcastReachesEverySubscriberInOrderOnce},
		{"PublishSendsTheRawBody", TestPublishSendsTheRawBody},
		{"FramesReachTheHookRawAndInOrder", TestFramesReachTheHookRawAndInOrder},
		{"HookWithoutSchemeIsDeliveredOverHTTP", TestHookWithoutSchemeIsDeliveredOverHTTP},
		{"ListenersIsExact", TestListenersIsExact},
		{"DeleteClosesSubscribersAndForgetsTheChannel", TestDeleteClosesSubscribersAndForgetsTheChannel},
		{"SubscribeToUnknownTokenIs404", TestSubscribeToUnknownTokenIs404},
		{"BadInputIsRefusedAndChangesNothing", TestBadInputIsRefusedAndChangesNothing},
		{"HookURLsAreKeptAsGiven", TestHookURLsAreKeptAsGiven},
		{"BodiesAreLimited", TestBodiesAreLimited},
		{"SlowSubscriberIsDroppedOthersGetEverything", TestSlowSubscriberIsDroppedOthersGetEverything},
		{"MessagesWaitForTheNextSubscriber", TestMessagesWaitForTheNextSubscriber},
		{"BacklogLongerThanTheSendQueueWaits", TestBacklogLongerThanTheSendQueueWaits},
		{"BacklogTheSendQueueLeftWaitsPastLivePublishes", TestBacklogTheSendQueueLeftWaitsPastLivePublishes},
		{"ResumeLeavesWhatItDidNotTakeForTheNextSubscriber", TestResumeLeavesWhatItDidNotTakeForTheNextSubscriber},
		{"FailedUpgradeGivesTheBacklogBack", TestFailedUpgradeGivesTheBacklogBack},
		{"FramesReachOnlyTheirOwnConnection", TestFramesReachOnlyTheirOwnConnection},
		{"SSEResumesFromLastEventID", TestSSEResumesFromLastEventID},
		{"BinaryMessagesBothWays", TestBinaryMessagesBothWays},
		{"PresenceEventsOncePerChange", TestPresenceEventsOncePerChange},
		{"TokensNeverReachTheLogs", TestTokensNeverReachTheLogs},
		{"ShutdownClosesSubscribersAndFinishesRequests", TestShutdownClosesSubscribersAndFinishesRequests},
	} {
		engineArgs = []string{"-redis", rs.url(), "-redis-prefix", fmt.Sprintf("test%d:", i)}
		t.Run(test.name, test.run)
	}
}

// BenchmarkRedisPublish is a publish through the engine on Redis, with one
// WebSocket subscriber on the same node receiving it.
func BenchmarkRedisPublish(b *testing.B) {
	rs := startRedis(b)
	d := startDaemon(b, "-redis", rs.url())
	ch := d.prepare("")
	sub := d.subscribe(ch.SubscriberToken)
	received := make(chan error, 1)
	go func() {
		var msg string
		for range b.N {
			sub.SetReadDeadline(time.Now().Add(waitTimeout))
			if err := websocket.Message.Receive(sub, &msg); err != nil {
				received <- err
				return
			}
		}
		received <- nil
	}()
	body := []byte(strings.Repeat("x", 64))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, _, err := d.hub.engine.publish(context.Background(), ch.PublisherToken, textMessage(body)); err != nil {
				b.Error(err)
				return
			}
		}
	})
	if err := <-received; err != nil {
		b.Fatal(err)
	}
}

func TestRedisSubscribersJoiningMidStreamMissNothingAfterTheirJoin(t *testing.T) {
	rs := startRedis(t)
	a, b := startNode(t, rs.url()), startNode(t, rs.url())
	ch := a.prepare("")
	reference := a.dial(ch.SubscriberToken)
	// Both nodes publish in rounds; a subscriber joins, on either node,
	// while each round but the last is published: each must get, from its
	// first message on, every later one of the common order, once.
	const rounds, perRound = 7, 40
	const n = rounds * perRound
	var late []*wsClient
	for r := range rounds {
		var wg sync.WaitGroup
		for _, d := range []*daemon{a, b} {
			wg.Go(func() {
				for i := range perRound {
					d.publish(ch.PublisherToken, fmt.Sprintf("%s %d", d.url, r*perRound+i))
				}
			})
		}
		if r < rounds-1 {
			late = append(late, []*daemon{a, b}[r%2].dial(ch.SubscriberToken))
		}
		wg.Wait()
	}
	a.publish(ch.PublisherToken, "end") // for a subscriber that joined after the others
	var order []string
	for range 2*n + 1 {
		_, p := reference.next()
		order = append(order, string(p))
	}
	for i, c := range late {
		_, p := c.next()
		if string(p) == "end" {
			t.Fatalf("late subscriber %d, joined while round %d of %d was published, got nothing before the end", i, i+1, rounds)
		}
		at := slices.Index(order, string(p))
		if at < 0 {
			t.Fatalf("late subscriber %d got %q, which the reference never did", i, p)
		}
		for _, want := range order[at+1:] {
			if _, p := c.next(); string(p) != want {
				t.Fatalf("late subscriber %d got %q, want %q (joined at %d of %d)", i, p, want, at, len(order))
			}
		}
	}
}

func TestRedisRestartedWithoutItsDataClosesTheChannels(t *testing.T) {
	rs := startRedis(t) // no persistence
	a := startNode(t, rs.url())
	ch := a.prepare("")
	sub := a.dial(ch.SubscriberToken)
	rs.kill()
	rs.start()
	// The node finds the channel gone when it subscribes again.
	if reason := sub.expectClose(1000); reason != "channel deleted" {
		t.Errorf("close reason %q", reason)
	}
	if status, _, _ := a.call("GET", "/channel/"+ch.PublisherToken, ""); status != 404 {
		t.Errorf("show after Redis lost the channel: %d", status)
	}
}

// TestRedisEditRacingJoinsHolds: a join reads the channel's hook URL from
// Redis while an edit through another node changes it. The edit answered
// 200 must hold on the joining node, however the join's read and the
// edit's announcement cross: the node may not go back to the URL before
// the edit.
func TestRedisEditRacingJoinsHolds(t *testing.T) {
	rs := startRedis(t)
	a, c := startNode(t, rs.url()), startNode(t, rs.url())
	hooks := []*hookServer{startHook(t, nil), startHook(t, nil)}
	ch := c.prepare(`{"subscriber_message_hook_url": "` + hooks[0].url + `"}`)
	sub := a.dial(ch.SubscriberToken) // A follows the channel throughout
	client := &http.Client{Timeout: waitTimeout}
	deadline := time.Now().Add(4 * time.Second)
	for round := 1; round <= 40 && time.Now().Before(deadline); round++ {
		// Event streams join on A while C edits the hook URL.
		var joins sync.WaitGroup
		for range 20 {
			joins.Go(func() {
				req, _ := http.NewRequest("GET", a.url+"/channel/subscribe/"+ch.SubscriberToken, nil)
				req.Header.Set("Accept", "text/event-stream")
				resp, err := client.Do(req)
				if err != nil {
					t.Errorf("join: %v", err)
					return
				}
				resp.Body.Close()
			})
		}
		want, old := hooks[round%2], hooks[(round+1)%2]
		c.mustCall("PATCH", "/channel/edit/"+ch.PublisherToken, `{"subscriber_message_hook_url": "`+want.url+`"}`, 200, nil)
		edited := time.Now()
		joins.Wait()
		// The edit reaches A within a second (TestRedisEveryRouteOnEveryNode),
		// and holds there.
		for i := 0; ; i++ {
			frame := fmt.Sprint("round ", round, " frame ", i)
			sub.send(true, websocket.TextFrame, []byte(frame))
			var r hookRequest
			select {
			case r = <-want.requests:
			case r = <-old.requests:
				if time.Since(edited) > time.Second {
					t.Fatalf("round %d: A posts to the hook URL before the edit %v after it: a join took it back", round, time.Since(edited).Round(time.Millisecond))
				}
				continue
			case <-time.After(waitTimeout):
				t.Fatal("the frame reached no hook")
			}
			if r.body != frame {
				t.Fatalf("hook got %q, want %q", r.body, frame)
			}
			break
		}
	}
}
