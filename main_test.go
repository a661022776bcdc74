package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// ---- A daemon behind a real listener, and clients for it ----

// waitTimeout bounds every wait of a test for something the daemon does.
const waitTimeout = 10 * time.Second

type daemon struct {
	t    *testing.T
	hub  *hub
	url  string // http://127.0.0.1:PORT
	logs *syncBuffer
}

// startDaemon starts a hub with the flags a user would type, behind
// httptest.NewServer.
func startDaemon(t *testing.T, args ...string) *daemon {
	return startDaemonWith(t, nil, args...)
}

// startDaemonWith also lets a test change settings no flag reaches, such as
// a sub-second ping interval.
func startDaemonWith(t *testing.T, tweak func(*config), args ...string) *daemon {
	t.Helper()
	cfg, err := parseConfig(args, io.Discard)
	if err != nil {
		t.Fatalf("parseConfig(%q): %v", args, err)
	}
	if tweak != nil {
		tweak(&cfg)
	}
	logs := &syncBuffer{}
	h := newHub(cfg, newLogger(logs, cfg.logLevel))
	srv := httptest.NewServer(h)
	t.Cleanup(func() {
		h.closeAll()
		srv.Close()
		ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
		defer cancel()
		if err := h.wait(ctx); err != nil {
			t.Errorf("daemon did not stop: %v", err)
		}
		if t.Failed() {
			t.Logf("daemon log:\n%s", logs)
		}
	})
	return &daemon{t: t, hub: h, url: srv.URL, logs: logs}
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
	req, err := http.NewRequest(method, d.url+path, strings.NewReader(body))
	if err != nil {
		d.t.Fatalf("new request: %v", err)
	}
	req.Host = host
	resp, err := http.DefaultClient.Do(req)
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

func (d *daemon) prepare(body string) channelJSON {
	d.t.Helper()
	var ch channelJSON
	d.mustCall("POST", "/channel/prepare", body, http.StatusOK, &ch)
	return ch
}

func (d *daemon) publish(token, body string) publishReply {
	d.t.Helper()
	var r publishReply
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
func receive(t *testing.T, ws *websocket.Conn) string {
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
func waitFor(t *testing.T, what string, cond func() bool) {
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
func recv[T any](t *testing.T, c <-chan T, what string) T {
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
	t         *testing.T
	conn      net.Conn
	br        *bufio.Reader
	closeSent bool
}

// dialWS makes the upgrade by hand. The header lines are sent as given, so
// a test may leave Origin out. It returns the response when it is not 101.
func dialWS(t *testing.T, rawURL string, header http.Header) (*wsClient, *http.Response) {
	t.Helper()
	u, err := url.Parse(rawURL)
	if err != nil {
		t.Fatalf("parse %s: %v", rawURL, err)
	}
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatalf("dial %s: %v", u.Host, err)
	}
	t.Cleanup(func() { conn.Close() })
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

// startHook serves a hook that answers with answer(r) (200 when nil).
func startHook(t *testing.T, answer func(*http.Request) int) *hookServer {
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

	if got := d.mustCall("POST", "/channel/publish/"+plain.PublisherToken, "hello", 200, nil); got != `{"type":"INF","message":"message handed to 0 subscriber(s)","subscribers":0}`+"\n" {
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
	}{
		{"GET", "/nowhere", 404, ""},
		{"GET", "/channel/a/b/c", 404, ""},
		{"POST", "/channel", 405, "GET, HEAD"},
		{"DELETE", "/channel/prepare", 405, "POST"},
		{"GET", "/channel/prepare", 405, "POST"},
		{"PUT", "/channel/publish/" + ch.PublisherToken, 405, "DELETE, POST"},
		{"GET", "/channel/publish/" + ch.PublisherToken, 405, "DELETE, POST"},
		{"POST", "/channel/edit/" + ch.PublisherToken, 405, "PATCH"},
		{"POST", "/channel/subscribe/" + ch.SubscriberToken, 405, "GET, HEAD"},
	}
	for _, tc := range tests {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			d := d.in(t)
			status, header, body := d.call(tc.method, tc.path, "")
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
	if !strings.Contains(d.logs.String(), `level=DEBUG msg="frame dropped: channel has no hook"`) {
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

func TestSubscribeRefusesWhatIsNotAnUpgrade(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	status, _, body := d.call("GET", "/channel/subscribe/"+ch.SubscriberToken, "")
	if status != 400 || !strings.Contains(body, `"type":"ERR"`) {
		t.Errorf("plain GET on subscribe: %d %s", status, body)
	}
	status, _, body = d.call("GET", "/channel/subscribe/nope", "")
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

func TestFlagsOutOfRangeAreRefused(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"-port", "70000"}, "-port 70000 is out of range"},
		{[]string{"-port", "-1"}, "-port -1 is out of range"},
		{[]string{"-port", "http"}, `invalid value "http" for flag -port`},
		{[]string{"-log-level", "0"}, "-log-level 0 is out of range"},
		{[]string{"-log-level", "4"}, "-log-level 4 is out of range"},
		{[]string{"-ping-interval", "0"}, "-ping-interval 0 is out of range"},
		{[]string{"-ping-interval", "86401"}, "-ping-interval 86401 is out of range"},
		{[]string{"-ping-interval", "1.5"}, `invalid value "1.5" for flag -ping-interval`},
		{[]string{"-host-name", " "}, "-host-name must not be empty"},
		{[]string{"-no-such-flag"}, "flag provided but not defined: -no-such-flag"},
		{[]string{"extra"}, `unexpected argument "extra"`},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := run(context.Background(), tc.args, func(string) string { return "" }, &stdout, &stderr)
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
	for _, name := range []string{"-port", "-host-name", "-log-level", "-ping-interval"} {
		if !strings.Contains(stdout.String(), "  "+name+" ") {
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

// runDaemon starts run() with args and -port 0, and returns its address and
// a function that stops it and returns what run returned.
func runDaemon(t *testing.T, args ...string) (addr string, stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	logs := &addrWatcher{addr: make(chan string, 1)}
	result := make(chan error, 1)
	go func() {
		result <- run(ctx, append([]string{"-port", "0"}, args...), func(string) string { return "" }, io.Discard, logs)
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
	t.Cleanup(func() { stop() })
	_, port, _ := net.SplitHostPort(addr)
	return "127.0.0.1:" + port, stop
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
	addr, stop := runDaemon(t)
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
		{"two objects", `{} {}`, "body has data after the JSON object"},
		{"unknown field", `{"hook": "http://x"}`, `body is not a valid JSON object: json: unknown field "hook"`},
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

func TestBodiesTooLargeAre413(t *testing.T) {
	d := startDaemon(t)
	ch := d.prepare("")
	for _, r := range []struct {
		method, path string
		size         int
	}{
		{"POST", "/channel/prepare", maxBodyBytes + 1},
		{"PATCH", "/channel/edit/" + ch.PublisherToken, maxBodyBytes + 1},
		{"POST", "/channel/publish/" + ch.PublisherToken, maxMessageBytes + 1},
	} {
		var got struct{ Type, Message string }
		d.mustCall(r.method, r.path, `{"tag":"`+strings.Repeat("a", r.size)+`"}`, 413, &got)
		if got.Type != "ERR" || !strings.Contains(got.Message, "body is larger than") {
			t.Errorf("%s %s: %+v", r.method, r.path, got)
		}
	}
}

// ---- Frames from subscribers ----

func TestSubscriberFramesAreCheckedAndReassembled(t *testing.T) {
	hook := startHook(t, nil)
	d := startDaemon(t)
	ch := d.prepare(fmt.Sprintf(`{"subscriber_message_hook_url": %q}`, hook.url))

	c := d.dial(ch.SubscriberToken)
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
		{"too big", func(c *wsClient) { c.send(true, websocket.BinaryFrame, make([]byte, maxMessageBytes+1)) }, closeTooBig},
		{"too big in fragments", func(c *wsClient) {
			c.send(false, websocket.BinaryFrame, make([]byte, maxMessageBytes/2+1))
			c.send(true, websocket.ContinuationFrame, make([]byte, maxMessageBytes/2+1))
		}, closeTooBig},
		{"not UTF-8", func(c *wsClient) { c.send(true, websocket.TextFrame, []byte{0xff, 0xfe}) }, closeInvalidData},
		{"unmasked", func(c *wsClient) { c.sendFrame(true, websocket.TextFrame, []byte("x"), false) }, closeProtocolError},
		{"continuation first", func(c *wsClient) { c.send(true, websocket.ContinuationFrame, []byte("x")) }, closeProtocolError},
		{"unknown opcode", func(c *wsClient) { c.send(true, 3, []byte("x")) }, closeProtocolError},
		{"fragmented ping", func(c *wsClient) { c.send(false, websocket.PingFrame, []byte("x")) }, closeProtocolError},
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
