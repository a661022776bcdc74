// Gockets gives request/response backends such as PHP a REST middleware to
// WebSockets. The backend prepares a channel with one HTTP call, hands the
// channel's subscriber token to a browser, and publishes with plain HTTP
// POSTs; what the browser sends back is POSTed to the backend's hook URL.
//
// This file reads top to bottom: flags and config, the hub and its channels,
// a subscriber's life, hook delivery, HTTP handlers, main. README.md has the API.
package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

// ---- Flags and config ----

// Timings and sizes that are not flags, each with its reason.
const (
	// writeWait bounds every write to a subscriber: a peer that takes longer
	// to accept bytes is stuck, and its connection is closed.
	writeWait = 10 * time.Second
	// closeGrace is how long we wait for a peer's close frame after ours
	// before dropping the TCP connection.
	closeGrace = time.Second
	// sendQueueLimit is how many messages may wait for one subscriber; a
	// subscriber that falls further behind is disconnected, never waited for.
	sendQueueLimit = 1024
	// hookQueueLimit is how many frames from one subscriber may wait for the
	// hook; more are dropped (and counted) rather than held without bound.
	hookQueueLimit = 256
	// maxBodyBytes bounds the JSON body of prepare and edit: a hook URL and a
	// tag never need more.
	maxBodyBytes = 64 << 10
	// maxMessageBytes bounds a published message and a frame from a subscriber.
	maxMessageBytes = 1 << 20
	// readHeaderTimeout stops clients that open a connection and never finish
	// their request headers (slowloris).
	readHeaderTimeout = 10 * time.Second
	// shutdownTimeout bounds a graceful shutdown.
	shutdownTimeout = 10 * time.Second
)

type config struct {
	port         int
	hostName     string
	logLevel     int
	pingInterval time.Duration
	hook         hookPolicy
}

// hookPolicy is how hard we try to deliver to a hook.
type hookPolicy struct {
	// timeout bounds one POST, so a hanging backend costs one timeout per
	// attempt and never more.
	timeout time.Duration
	// A hook that is down or answers 5xx is tried attempts times, waiting
	// backoffMin, then twice as long each time, at most backoffMax.
	attempts               int
	backoffMin, backoffMax time.Duration
}

var defaultHookPolicy = hookPolicy{timeout: 5 * time.Second, attempts: 5, backoffMin: 250 * time.Millisecond, backoffMax: 4 * time.Second}

// usageError is a bad command line: main exits with status 2 for it.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// parseConfig reads the command line. For -h it prints every flag to stdout
// and returns flag.ErrHelp.
func parseConfig(args []string, stdout io.Writer) (config, error) {
	cfg := config{hook: defaultHookPolicy}
	var pingSeconds int
	fs := flag.NewFlagSet("gockets", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.IntVar(&cfg.port, "port", 8844, "port of the server, 1-65535 (0 picks a free one)")
	fs.StringVar(&cfg.hostName, "host-name", "localhost", "admin routes answer only requests whose Host is this name (any port)")
	fs.IntVar(&cfg.logLevel, "log-level", 1, "1 info and error, 2 error only, 3 everything with debug")
	fs.IntVar(&pingSeconds, "ping-interval", 60, "seconds between pings, and the time allowed for the pong (1-86400)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: gockets [flags]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			fs.Usage()
			return cfg, err
		}
		return cfg, usageError{err}
	}
	if fs.NArg() > 0 {
		return cfg, usageError{fmt.Errorf("unexpected argument %q: every setting is a flag", fs.Arg(0))}
	}
	switch {
	case cfg.port < 0 || cfg.port > 65535:
		return cfg, usageError{fmt.Errorf("-port %d is out of range: use 1-65535, or 0 for a free port", cfg.port)}
	case strings.TrimSpace(cfg.hostName) == "":
		return cfg, usageError{errors.New("-host-name must not be empty")}
	case cfg.logLevel < 1 || cfg.logLevel > 3:
		return cfg, usageError{fmt.Errorf("-log-level %d is out of range: use 1 (info), 2 (error) or 3 (debug)", cfg.logLevel)}
	case pingSeconds < 1 || pingSeconds > 86400:
		return cfg, usageError{fmt.Errorf("-ping-interval %d is out of range: use 1-86400 seconds", pingSeconds)}
	}
	cfg.pingInterval = time.Duration(pingSeconds) * time.Second
	return cfg, nil
}

// newLogger maps -log-level to slog levels: 1 info, 2 error, 3 debug.
func newLogger(w io.Writer, logLevel int) *slog.Logger {
	level := new(slog.LevelVar)
	switch logLevel {
	case 2:
		level.Set(slog.LevelError)
	case 3:
		level.Set(slog.LevelDebug)
	default:
		level.Set(slog.LevelInfo)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

// ---- The hub and its channels ----

// hub owns every channel and every connection. Handlers receive it; nothing
// else is shared.
type hub struct {
	cfg   config
	log   *slog.Logger
	mux   *http.ServeMux
	hooks *http.Client

	mu           sync.RWMutex
	byPublisher  map[string]*channel
	bySubscriber map[string]*channel
	prepared     uint64 // channels prepared so far, to list them in order

	closing          atomic.Bool // shutdown has begun: no new subscribers
	lastSubscriberID atomic.Uint64
	connections      sync.WaitGroup // one per subscriber handler
	hookWorkers      sync.WaitGroup // one per subscriber with hook deliveries pending
	hookCtx          context.Context
	cancelHooks      context.CancelFunc
}

// channel is one pub/sub topic with its two tokens.
type channel struct {
	publisherToken  string
	subscriberToken string
	seq             uint64 // order of preparation

	mu          sync.Mutex
	hookURL     *string // exactly as given; nil when unset
	hookTarget  string  // where frames are POSTed: hookURL with a scheme
	tag         *string
	subscribers []*subscriber // each knows its index here
	deleted     bool
}

// message is one published body, encoded once and shared by every subscriber.
type message struct {
	data []byte
}

func newHub(cfg config, log *slog.Logger) *hub {
	h := &hub{
		cfg:          cfg,
		log:          log,
		byPublisher:  make(map[string]*channel),
		bySubscriber: make(map[string]*channel),
		hooks: &http.Client{
			Timeout: cfg.hook.timeout,
			// A hook answers; it does not send us elsewhere.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}
	h.hookCtx, h.cancelHooks = context.WithCancel(context.Background())
	h.mux = h.routes()
	return h
}

// newToken returns 130 random bits from crypto/rand in base32: URL-safe and
// unguessable. The two tokens of a channel are drawn independently.
func newToken() string { return rand.Text() }

// prepare creates a channel with fresh tokens.
func (h *hub) prepare(opts channelOptions) *channel {
	ch := &channel{}
	opts.applyTo(ch)
	h.mu.Lock()
	defer h.mu.Unlock()
	for {
		ch.publisherToken, ch.subscriberToken = newToken(), newToken()
		_, taken := h.byPublisher[ch.publisherToken]
		_, taken2 := h.bySubscriber[ch.subscriberToken]
		if !taken && !taken2 {
			break
		}
	}
	h.prepared++
	ch.seq = h.prepared
	h.byPublisher[ch.publisherToken] = ch
	h.bySubscriber[ch.subscriberToken] = ch
	return ch
}

func (h *hub) byPublisherToken(token string) *channel {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.byPublisher[token]
}

func (h *hub) bySubscriberToken(token string) *channel {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.bySubscriber[token]
}

// all returns every channel, oldest first.
func (h *hub) all() []*channel {
	h.mu.RLock()
	all := make([]*channel, 0, len(h.byPublisher))
	for _, ch := range h.byPublisher {
		all = append(all, ch)
	}
	h.mu.RUnlock()
	slices.SortFunc(all, func(a, b *channel) int { return cmp.Compare(a.seq, b.seq) })
	return all
}

// channels lists the channels whose tag matches, or all when match is nil.
func (h *hub) channels(match *regexp.Regexp) []channelJSON {
	list := []channelJSON{}
	for _, ch := range h.all() {
		view := ch.view()
		if match == nil || view.Tag != nil && match.MatchString(*view.Tag) {
			list = append(list, view)
		}
	}
	return list
}

// delete removes a channel and closes its subscribers with 1000. It waits
// for nothing: each subscriber's writer sends the close frame on its own.
func (h *hub) delete(ch *channel) bool {
	h.mu.Lock()
	if h.byPublisher[ch.publisherToken] != ch {
		h.mu.Unlock()
		return false
	}
	delete(h.byPublisher, ch.publisherToken)
	delete(h.bySubscriber, ch.subscriberToken)
	h.mu.Unlock()

	ch.mu.Lock()
	ch.deleted = true
	subs := ch.subscribers
	ch.subscribers = nil
	for _, s := range subs {
		s.index = -1
	}
	ch.mu.Unlock()
	for _, s := range subs {
		s.stop(farewell{closeNormal, "channel deleted", true})
	}
	return true
}

// closeAll begins shutdown: no subscriber may join, and every connected
// subscriber is closed with 1001 (going away).
func (h *hub) closeAll() {
	h.closing.Store(true)
	for _, ch := range h.all() {
		ch.mu.Lock()
		subs := slices.Clone(ch.subscribers)
		ch.mu.Unlock()
		for _, s := range subs {
			s.stop(farewell{closeGoingAway, "server shutting down", true})
		}
	}
}

// wait waits, until ctx ends, for every subscriber connection to close and
// every queued hook delivery to finish; then it abandons what is left.
func (h *hub) wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		h.connections.Wait()
		h.hookWorkers.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		h.cancelHooks()
		return fmt.Errorf("connections and hook deliveries still running: %w", ctx.Err())
	}
}

// publish hands one message to every subscriber of the channel and returns
// how many took it. A subscriber whose queue is full is disconnected, never
// waited for.
func (ch *channel) publish(m *message) (int, bool) {
	var slow []*subscriber
	ch.mu.Lock()
	if ch.deleted {
		ch.mu.Unlock()
		return 0, false
	}
	delivered := 0
	for _, s := range ch.subscribers {
		if s.enqueue(m) {
			delivered++
		} else {
			slow = append(slow, s)
		}
	}
	ch.mu.Unlock()
	for _, s := range slow {
		s.stop(farewell{closePolicyViolation, "too slow: send queue full", false})
	}
	return delivered, true
}

// join adds a subscriber; false when the channel is gone or we shut down.
// closing is read under ch.mu, which closeAll takes after setting it, so a
// subscriber either sees it or is seen by closeAll.
func (h *hub) join(ch *channel, s *subscriber) bool {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if h.closing.Load() || ch.deleted {
		return false
	}
	s.index = len(ch.subscribers)
	ch.subscribers = append(ch.subscribers, s)
	return true
}

// leave removes a subscriber, if still there, so listeners is exact.
func (ch *channel) leave(s *subscriber) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	i := s.index
	if i < 0 {
		return
	}
	last := len(ch.subscribers) - 1
	ch.subscribers[i] = ch.subscribers[last]
	ch.subscribers[i].index = i
	ch.subscribers[last] = nil
	ch.subscribers = ch.subscribers[:last]
	s.index = -1
}

// hookDestination is where frames from this channel's subscribers go now.
func (ch *channel) hookDestination() string {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.hookTarget
}

// channelJSON is the channel object of the API.
type channelJSON struct {
	PublisherToken  string  `json:"publisher_token"`
	SubscriberToken string  `json:"subscriber_token"`
	HookURL         *string `json:"subscriber_message_hook_url"`
	Tag             *string `json:"tag"`
	Listeners       int     `json:"listeners"`
}

func (ch *channel) view() channelJSON {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return channelJSON{
		PublisherToken:  ch.publisherToken,
		SubscriberToken: ch.subscriberToken,
		HookURL:         ch.hookURL,
		Tag:             ch.tag,
		Listeners:       len(ch.subscribers),
	}
}

// channelOptions is the body of prepare and edit. A field left out keeps its
// value; null or "" clears it.
type channelOptions struct {
	setHook, setTag bool
	hookURL, tag    *string
	hookTarget      string
}

func (o channelOptions) applyTo(ch *channel) {
	if o.setHook {
		ch.hookURL, ch.hookTarget = o.hookURL, o.hookTarget
	}
	if o.setTag {
		ch.tag = o.tag
	}
}

func (ch *channel) edit(opts channelOptions) bool {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if ch.deleted {
		return false
	}
	opts.applyTo(ch)
	return true
}

// parseChannelOptions reads a prepare or edit body. An empty body, {} and []
// (what PHP's json_encode makes of an empty array) mean no options.
func parseChannelOptions(body []byte) (channelOptions, error) {
	var opts channelOptions
	body = bytes.TrimSpace(body)
	if len(body) == 0 || bytes.Equal(body, []byte("[]")) {
		return opts, nil
	}
	var fields struct {
		HookURL json.RawMessage `json:"subscriber_message_hook_url"`
		Tag     json.RawMessage `json:"tag"`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&fields); err != nil {
		return opts, fmt.Errorf("body is not a valid JSON object: %w", err)
	}
	if dec.More() {
		return opts, errors.New("body has data after the JSON object")
	}
	var err error
	if opts.hookURL, opts.setHook, err = optionalString("subscriber_message_hook_url", fields.HookURL); err != nil {
		return opts, err
	}
	if opts.tag, opts.setTag, err = optionalString("tag", fields.Tag); err != nil {
		return opts, err
	}
	if opts.hookURL != nil {
		if opts.hookTarget, err = hookTarget(*opts.hookURL); err != nil {
			return opts, err
		}
	}
	return opts, nil
}

// optionalString decodes a field that is a string, null or absent.
func optionalString(name string, raw json.RawMessage) (value *string, set bool, err error) {
	if raw == nil {
		return nil, false, nil
	}
	if string(raw) == "null" {
		return nil, true, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return nil, false, fmt.Errorf("%s must be a string or null", name)
	}
	if s == "" {
		return nil, true, nil
	}
	return &s, true, nil
}

// hookTarget checks a hook URL and returns where to POST. http and https are
// kept as given; a URL without a scheme ("domain.com", "localhost:8080/hook")
// is delivered over http; any other scheme is refused.
func hookTarget(raw string) (string, error) {
	target := raw
	if scheme, rest, ok := strings.Cut(raw, ":"); ok && isScheme(scheme) && !startsWithPort(rest) {
		if s := strings.ToLower(scheme); s != "http" && s != "https" {
			return "", fmt.Errorf("subscriber_message_hook_url: scheme %q is not allowed, use http or https", scheme)
		}
	} else {
		target = "http://" + raw
	}
	if u, err := url.Parse(target); err != nil || !validHost(u.Hostname()) {
		return "", fmt.Errorf("subscriber_message_hook_url %q is not a valid URL", raw)
	}
	return target, nil
}

// isScheme reports whether s has the form of a URL scheme (RFC 3986, 3.1).
func isScheme(s string) bool {
	if s == "" || !('a' <= s[0] && s[0] <= 'z' || 'A' <= s[0] && s[0] <= 'Z') {
		return false
	}
	return strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.") == ""
}

// startsWithPort tells "8080/hook" (the rest of "localhost:8080/hook") from
// what follows a real scheme, such as "//host" or "alert(1)".
func startsWithPort(s string) bool {
	end := strings.IndexAny(s, "/?#")
	if end < 0 {
		end = len(s)
	}
	_, err := strconv.ParseUint(s[:end], 10, 16)
	return err == nil
}

// validHost accepts a DNS name or an IP address, which url.Parse does not
// check (it lets "exa mple.com" through).
func validHost(host string) bool {
	if net.ParseIP(host) != nil {
		return true
	}
	return host != "" && strings.Trim(host, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_") == ""
}

// ---- A subscriber's life ----

// WebSocket close codes we send (RFC 6455, section 7.4.1).
const (
	closeNormal          = 1000
	closeGoingAway       = 1001
	closeProtocolError   = 1002
	closeInvalidData     = 1007
	closePolicyViolation = 1008
	closeTooBig          = 1009
)

// farewell says why a subscriber ends: the close code and reason it is
// sent, and whether the messages still queued for it go out first.
type farewell struct {
	code   int
	reason string
	drain  bool
}

// subscriber is one WebSocket connection to a channel. The handler goroutine
// reads; one writer goroutine owns every write, pings included; a hook worker
// runs while frames wait for the hook. stop ends them.
type subscriber struct {
	id  uint64
	hub *hub
	ch  *channel
	ws  *websocket.Conn
	log *slog.Logger

	index int // in ch.subscribers, guarded by ch.mu; -1 once removed

	mu          sync.Mutex
	queue       []*message // waiting for the writer
	pong        []byte     // payload of a ping to answer, nil if none
	bye         farewell   // set once, by stop
	hookQueue   []hookItem
	hookRunning bool
	hookDropped bool // a drop was logged; cleared once the queue drains

	wake     chan struct{} // the writer has something to do
	quit     chan struct{} // closed by stop
	stopOnce sync.Once
	done     chan struct{} // closed when the writer has finished
}

func (h *hub) newSubscriber(ch *channel) *subscriber {
	id := h.lastSubscriberID.Add(1)
	return &subscriber{
		id:    id,
		hub:   h,
		ch:    ch,
		log:   h.log.With("channel", fingerprint(ch.subscriberToken), "subscriber", id),
		index: -1,
		wake:  make(chan struct{}, 1),
		quit:  make(chan struct{}),
		done:  make(chan struct{}),
	}
}

// serve is the life of one subscriber after the upgrade, run by the handler
// goroutine: it reads until the end, then waits for the writer to finish.
func (s *subscriber) serve(ws *websocket.Conn) {
	s.ws = ws
	s.log.Debug("subscriber connected")
	go s.writeLoop()
	s.stop(s.readLoop())
	<-s.done
	s.log.Debug("subscriber disconnected", "code", s.bye.code, "reason", s.bye.reason)
}

// stop ends the subscriber once: it leaves the channel at once, so that
// listeners is exact, and the writer says goodbye.
func (s *subscriber) stop(bye farewell) {
	s.stopOnce.Do(func() {
		s.ch.leave(s)
		s.mu.Lock()
		s.bye = bye
		s.mu.Unlock()
		close(s.quit)
	})
}

// enqueue hands a message to the writer without blocking; false when the
// subscriber is too far behind.
func (s *subscriber) enqueue(m *message) bool {
	s.mu.Lock()
	if len(s.queue) >= sendQueueLimit {
		s.mu.Unlock()
		return false
	}
	s.queue = append(s.queue, m)
	s.mu.Unlock()
	s.signal()
	return true
}

func (s *subscriber) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// readLoop reads frames until the connection ends and says how to close
// it. It never writes: pings are answered by the writer. Any frame from the
// peer, pongs included, proves it alive for two more ping intervals. After
// a bad frame it sends our close and discards what follows until the
// peer's close, so that the peer can read ours.
func (s *subscriber) readLoop() farewell {
	var msg []byte
	var msgType byte
	inMessage, failed := false, false
	for {
		s.extendReadDeadline()
		fr, err := s.ws.NewFrameReader()
		if isTimeout(err) {
			return farewell{closeGoingAway, "ping timeout", false}
		} else if err != nil {
			return farewell{closeGoingAway, "connection lost", false}
		}
		h := parseFrameHeader(fr.HeaderReader(), fr.Len())
		if h.opcode == websocket.CloseFrame && h.length <= 125 {
			payload := make([]byte, h.length)
			if _, err := io.ReadFull(fr, payload); err != nil {
				return farewell{closeGoingAway, "connection lost", false}
			}
			return farewell{peerCloseCode(payload), "closed by peer", false}
		}
		if !failed {
			if bye, bad := h.problem(inMessage, len(msg)); bad {
				failed = true
				s.stop(bye)
			}
		}
		if failed {
			if _, err := io.Copy(io.Discard, fr); err != nil {
				return farewell{closeGoingAway, "connection lost", false}
			}
			continue
		}
		switch h.opcode {
		case websocket.PingFrame, websocket.PongFrame:
			payload := make([]byte, h.length)
			if _, err := io.ReadFull(fr, payload); err != nil {
				return farewell{closeGoingAway, "connection lost", false}
			}
			if h.opcode == websocket.PingFrame {
				s.mu.Lock()
				s.pong = payload
				s.mu.Unlock()
				s.signal()
			}
			continue
		case websocket.TextFrame, websocket.BinaryFrame:
			inMessage, msgType, msg = true, h.opcode, nil
		}
		start := len(msg)
		msg = slices.Grow(msg, h.length)[:start+h.length]
		if _, err := io.ReadFull(fr, msg[start:]); err != nil {
			return farewell{closeGoingAway, "connection lost", false}
		}
		if !h.fin {
			continue
		}
		inMessage = false
		if msgType == websocket.TextFrame && !utf8.Valid(msg) {
			failed = true
			s.stop(farewell{closeInvalidData, "text frame is not UTF-8", false})
			continue
		}
		s.forward(msg, msgType == websocket.BinaryFrame)
	}
}

// extendReadDeadline gives the peer two ping intervals more, unless we are
// closing: then finish has set the deadline, and it stands.
func (s *subscriber) extendReadDeadline() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.bye.code != 0 {
		return
	}
	if err := s.ws.SetReadDeadline(time.Now().Add(2 * s.hub.cfg.pingInterval)); err != nil {
		s.log.Debug("set read deadline", "err", err)
	}
}

type frameHeader struct {
	fin, rsv, masked bool
	opcode           byte
	length           int // of the payload; -1 when it does not fit an int
}

// parseFrameHeader reads the bits x/net/websocket parsed but does not expose.
func parseFrameHeader(r io.Reader, frameLen int) frameHeader {
	b, ok := r.(interface{ Bytes() []byte })
	if !ok || len(b.Bytes()) < 2 {
		return frameHeader{opcode: websocket.UnknownFrame}
	}
	raw := b.Bytes()
	h := frameHeader{
		fin:    raw[0]&0x80 != 0,
		rsv:    raw[0]&0x70 != 0,
		opcode: raw[0] & 0x0f,
		masked: raw[1]&0x80 != 0,
		length: frameLen - len(raw),
	}
	if h.length < 0 {
		h.length = -1
	}
	return h
}

// problem says what is wrong with a frame, given the message it may
// continue and the bytes of it read so far.
func (h frameHeader) problem(inMessage bool, msgBytes int) (farewell, bool) {
	control := h.opcode >= websocket.CloseFrame
	switch {
	case !h.masked || h.rsv:
		return farewell{closeProtocolError, "client frames must be masked and use no extensions", false}, true
	case control && (!h.fin || h.length < 0 || h.length > 125):
		return farewell{closeProtocolError, "bad control frame", false}, true
	case control && h.opcode > websocket.PongFrame:
		return farewell{closeProtocolError, "unknown opcode", false}, true
	case control:
		return farewell{}, false
	case h.opcode == websocket.ContinuationFrame && !inMessage:
		return farewell{closeProtocolError, "continuation without a message", false}, true
	case (h.opcode == websocket.TextFrame || h.opcode == websocket.BinaryFrame) && inMessage:
		return farewell{closeProtocolError, "new message before the last one ended", false}, true
	case h.opcode > websocket.BinaryFrame:
		return farewell{closeProtocolError, "unknown opcode", false}, true
	case h.length < 0 || h.length > maxMessageBytes-msgBytes:
		return farewell{closeTooBig, "message too big", false}, true
	}
	return farewell{}, false
}

// peerCloseCode is the code to echo to a peer's close frame: its own when
// that is a code a peer may send (RFC 6455, 7.4), else 1002.
func peerCloseCode(payload []byte) int {
	if len(payload) < 2 {
		return closeNormal
	}
	code := int(payload[0])<<8 | int(payload[1])
	switch {
	case code >= 1000 && code <= 1003, code >= 1007 && code <= 1011, code >= 3000 && code <= 4999:
		return code
	}
	return closeProtocolError
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// writeLoop is the only goroutine that writes to the connection: queued
// messages, pongs, pings every interval, and the close frame at the end.
func (s *subscriber) writeLoop() {
	defer close(s.done)
	ping := time.NewTicker(s.hub.cfg.pingInterval)
	defer ping.Stop()
	var batch []*message
	for {
		var err error
		select {
		case <-s.wake:
			batch, err = s.flush(batch)
		case <-ping.C:
			err = s.write(websocket.PingFrame, nil)
		case <-s.quit:
			s.finish(batch)
			return
		}
		if err != nil {
			s.log.Debug("write failed", "err", err)
			s.stop(farewell{closeGoingAway, "write failed", false})
		}
	}
}

// flush writes everything queued and answers a pending ping. It reuses
// batch's array so that a busy subscriber allocates nothing per message.
func (s *subscriber) flush(batch []*message) ([]*message, error) {
	s.mu.Lock()
	batch, s.queue = s.queue, batch[:0]
	pong := s.pong
	s.pong = nil
	s.mu.Unlock()
	if pong != nil {
		if err := s.write(websocket.PongFrame, pong); err != nil {
			return batch, err
		}
	}
	for i, m := range batch {
		if err := s.write(websocket.TextFrame, m.data); err != nil {
			return batch, err
		}
		batch[i] = nil
	}
	return batch[:0], nil
}

// finish says goodbye: what is still queued when the close is orderly, then
// the close frame; then it lets the reader wait briefly for the peer's.
func (s *subscriber) finish(batch []*message) {
	s.mu.Lock()
	bye := s.bye
	s.mu.Unlock()
	if bye.drain {
		if _, err := s.flush(batch); err != nil {
			s.log.Debug("final flush", "err", err)
		}
	}
	if err := s.writeClose(bye); err != nil {
		s.log.Debug("write close", "err", err)
	}
	// The reader is blocked on the socket: give the peer closeGrace to answer.
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.ws.SetReadDeadline(time.Now().Add(closeGrace)); err != nil {
		s.log.Debug("set read deadline", "err", err)
	}
}

func (s *subscriber) writeClose(bye farewell) error {
	payload := make([]byte, 2, 2+len(bye.reason))
	payload[0], payload[1] = byte(bye.code>>8), byte(bye.code)
	return s.write(websocket.CloseFrame, append(payload, bye.reason...))
}

// write sends one frame within writeWait.
func (s *subscriber) write(opcode byte, payload []byte) error {
	if err := s.ws.SetWriteDeadline(time.Now().Add(writeWait)); err != nil {
		return fmt.Errorf("set write deadline: %w", err)
	}
	w, err := s.ws.NewFrameWriter(opcode)
	if err != nil {
		return fmt.Errorf("new frame: %w", err)
	}
	if _, err := w.Write(payload); err != nil {
		return fmt.Errorf("write frame: %w", err)
	}
	return w.Close()
}

// ---- Hook delivery ----

// hookItem is one frame on its way to the backend.
type hookItem struct {
	target string
	body   []byte
	binary bool
}

// forward queues a frame for the channel's hook. Frames from one connection
// are delivered in order by one worker goroutine, which runs only while
// frames wait.
func (s *subscriber) forward(body []byte, binary bool) {
	target := s.ch.hookDestination()
	if target == "" {
		s.log.Debug("frame dropped: channel has no hook", "bytes", len(body))
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.hookQueue) >= hookQueueLimit {
		if !s.hookDropped {
			s.log.Warn("hook queue full: dropping frames until it drains")
			s.hookDropped = true
		}
		return
	}
	s.hookQueue = append(s.hookQueue, hookItem{target: target, body: body, binary: binary})
	if !s.hookRunning {
		s.hookRunning = true
		s.hub.hookWorkers.Add(1)
		go s.deliverHooks()
	}
}

// deliverHooks posts queued frames one after the other until none is left.
func (s *subscriber) deliverHooks() {
	defer s.hub.hookWorkers.Done()
	for {
		s.mu.Lock()
		if len(s.hookQueue) == 0 {
			s.hookRunning, s.hookDropped = false, false
			s.hookQueue = nil
			s.mu.Unlock()
			return
		}
		item := s.hookQueue[0]
		s.hookQueue[0] = hookItem{}
		s.hookQueue = s.hookQueue[1:]
		s.mu.Unlock()
		if err := s.hub.deliver(item); err != nil {
			s.log.Warn("hook delivery failed; frame dropped", "err", err)
		}
	}
}

// deliver POSTs one item, retrying connection errors and 5xx answers with
// capped exponential backoff.
func (h *hub) deliver(item hookItem) error {
	policy := h.cfg.hook
	backoff := policy.backoffMin
	for attempt := 1; ; attempt++ {
		retry, err := h.post(item)
		if err == nil {
			return nil
		}
		if !retry || attempt >= policy.attempts {
			return fmt.Errorf("attempt %d of %d: %w", attempt, policy.attempts, err)
		}
		select {
		case <-time.After(backoff):
		case <-h.hookCtx.Done():
			return fmt.Errorf("shutting down after attempt %d: %w", attempt, err)
		}
		backoff = min(2*backoff, policy.backoffMax)
	}
}

// post makes one attempt; retry says whether another one may succeed.
func (h *hub) post(item hookItem) (retry bool, err error) {
	req, err := http.NewRequestWithContext(h.hookCtx, http.MethodPost, item.target, bytes.NewReader(item.body))
	if err != nil {
		return false, fmt.Errorf("build request: %w", err)
	}
	req.Header.Set("Content-Type", "text/plain; charset=utf-8")
	if item.binary {
		req.Header.Set("Content-Type", "application/octet-stream")
	}
	resp, err := h.hooks.Do(req)
	if err != nil {
		return true, fmt.Errorf("post hook: %w", err)
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)); err != nil {
		h.log.Debug("read hook answer", "err", err)
	}
	switch {
	case resp.StatusCode >= 500:
		return true, fmt.Errorf("hook answered %s", resp.Status)
	case resp.StatusCode >= 300:
		return false, fmt.Errorf("hook answered %s", resp.Status)
	}
	return false, nil
}

// ---- HTTP handlers ----

// routes registers every route: the whole API at a glance.
func (h *hub) routes() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /channel/prepare", h.admin(h.handlePrepare))
	mux.HandleFunc("GET /channel", h.admin(h.handleList))
	mux.HandleFunc("GET /channel/{publisher_token}", h.admin(h.handleShow))
	mux.HandleFunc("GET /channel/subscribe/{subscriber_token}", h.handleSubscribe)
	mux.HandleFunc("POST /channel/publish/{publisher_token}", h.admin(h.handlePublish))
	mux.HandleFunc("DELETE /channel/publish/{publisher_token}", h.admin(h.handleDelete))
	// The API of the original's 0.2 PHP client, over the same channels.
	mux.HandleFunc("GET /channel/show", h.admin(h.handleList))
	mux.HandleFunc("GET /channel/show/{publisher_token}", h.admin(h.handleShow))
	mux.HandleFunc("PATCH /channel/edit/{publisher_token}", h.admin(h.handleEdit))
	return mux
}

// ServeHTTP routes a request; what no route takes gets a JSON 404 or 405.
func (h *hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// prepare is a literal under the /channel/{publisher_token} wildcard:
	// "GET /channel/prepare" is a wrong method, not a token.
	if r.URL.Path == "/channel/prepare" && r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		reply(w, http.StatusMethodNotAllowed, "ERR", "method "+r.Method+" is not allowed here; allowed: POST")
		return
	}
	if _, pattern := h.mux.Handler(r); pattern == "" {
		h.routeError(w, r)
		return
	}
	h.mux.ServeHTTP(w, r)
}

// routeError answers like the mux would (404, or 405 with Allow), in JSON.
func (h *hub) routeError(w http.ResponseWriter, r *http.Request) {
	handler, _ := h.mux.Handler(r)
	rec := &headerRecorder{header: make(http.Header), code: http.StatusOK}
	handler.ServeHTTP(rec, r)
	if rec.code == http.StatusMethodNotAllowed {
		w.Header().Set("Allow", rec.header.Get("Allow"))
		reply(w, http.StatusMethodNotAllowed, "ERR", fmt.Sprintf("method %s is not allowed here; allowed: %s", r.Method, rec.header.Get("Allow")))
		return
	}
	reply(w, http.StatusNotFound, "ERR", "no such route: "+r.Method+" "+r.URL.Path)
}

// headerRecorder keeps the status and headers of the mux's own error reply.
type headerRecorder struct {
	header http.Header
	code   int
}

func (r *headerRecorder) Header() http.Header         { return r.header }
func (r *headerRecorder) Write(p []byte) (int, error) { return len(p), nil }
func (r *headerRecorder) WriteHeader(code int)        { r.code = code }

// admin locks a route to requests whose Host names -host-name.
func (h *hub) admin(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if !hostMatches(r.Host, h.cfg.hostName) {
			reply(w, http.StatusForbidden, "ERR", "admin routes answer only to host "+h.cfg.hostName)
			return
		}
		next(w, r)
	}
}

// hostMatches compares a Host header, with any port, to a name.
func hostMatches(hostHeader, name string) bool {
	host := hostHeader
	if h, _, err := net.SplitHostPort(hostHeader); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	return strings.EqualFold(host, name)
}

// reply writes every reply that is not a channel: {"type", "message"}.
func reply(w http.ResponseWriter, status int, typ, msg string) {
	writeJSON(w, status, struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	}{typ, msg})
}

// writeJSON writes every JSON answer of the daemon.
func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		body = []byte(`{"type":"ERR","message":"cannot encode the reply"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)+1))
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n')) // the client is gone if this fails; nothing to do
}

// readBody reads a request body of at most limit bytes, answering 413 or 400
// itself when it cannot.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err == nil {
		return body, true
	}
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		reply(w, http.StatusRequestEntityTooLarge, "ERR", fmt.Sprintf("body is larger than %d bytes", limit))
		return nil, false
	}
	reply(w, http.StatusBadRequest, "ERR", "cannot read body: "+err.Error())
	return nil, false
}

func notFound(w http.ResponseWriter, what string) {
	reply(w, http.StatusNotFound, "ERR", what+" token not found")
}

func (h *hub) handlePrepare(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r, maxBodyBytes)
	if !ok {
		return
	}
	opts, err := parseChannelOptions(body)
	if err != nil {
		reply(w, http.StatusBadRequest, "ERR", err.Error())
		return
	}
	ch := h.prepare(opts)
	h.log.Info("channel prepared", "channel", fingerprint(ch.subscriberToken))
	writeJSON(w, http.StatusOK, ch.view())
}

func (h *hub) handleList(w http.ResponseWriter, r *http.Request) {
	var match *regexp.Regexp
	if search := r.URL.Query().Get("search"); search != "" {
		var err error
		if match, err = regexp.Compile(search); err != nil {
			reply(w, http.StatusBadRequest, "ERR", "search is not a valid regular expression: "+err.Error())
			return
		}
	}
	writeJSON(w, http.StatusOK, struct {
		Channels []channelJSON `json:"channels"`
	}{h.channels(match)})
}

func (h *hub) handleShow(w http.ResponseWriter, r *http.Request) {
	ch := h.byPublisherToken(r.PathValue("publisher_token"))
	if ch == nil {
		notFound(w, "publisher")
		return
	}
	writeJSON(w, http.StatusOK, ch.view())
}

func (h *hub) handleEdit(w http.ResponseWriter, r *http.Request) {
	ch := h.byPublisherToken(r.PathValue("publisher_token"))
	if ch == nil {
		notFound(w, "publisher")
		return
	}
	body, ok := readBody(w, r, maxBodyBytes)
	if !ok {
		return
	}
	opts, err := parseChannelOptions(body)
	if err != nil {
		reply(w, http.StatusBadRequest, "ERR", err.Error())
		return
	}
	if !ch.edit(opts) {
		notFound(w, "publisher")
		return
	}
	writeJSON(w, http.StatusOK, ch.view())
}

func (h *hub) handlePublish(w http.ResponseWriter, r *http.Request) {
	ch := h.byPublisherToken(r.PathValue("publisher_token"))
	if ch == nil {
		notFound(w, "publisher")
		return
	}
	body, ok := readBody(w, r, maxMessageBytes)
	if !ok {
		return
	}
	n, ok := ch.publish(&message{data: body})
	if !ok {
		notFound(w, "publisher")
		return
	}
	writeJSON(w, http.StatusOK, publishReply{
		Type:        "INF",
		Message:     fmt.Sprintf("message handed to %d subscriber(s)", n),
		Subscribers: n,
	})
}

// publishReply says how many subscribers took the message.
type publishReply struct {
	Type        string `json:"type"`
	Message     string `json:"message"`
	Subscribers int    `json:"subscribers"`
}

func (h *hub) handleDelete(w http.ResponseWriter, r *http.Request) {
	ch := h.byPublisherToken(r.PathValue("publisher_token"))
	if ch == nil || !h.delete(ch) {
		notFound(w, "publisher")
		return
	}
	h.log.Info("channel deleted", "channel", fingerprint(ch.subscriberToken))
	reply(w, http.StatusOK, "OK", "channel closed and deleted")
}

// handleSubscribe upgrades to a WebSocket. Unknown tokens get a 404 before
// any upgrade. Our Handshake, unlike websocket.Handler's, accepts clients
// without an Origin header (PHP, node, curl).
func (h *hub) handleSubscribe(w http.ResponseWriter, r *http.Request) {
	ch := h.bySubscriberToken(r.PathValue("subscriber_token"))
	if ch == nil {
		notFound(w, "subscriber")
		return
	}
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		reply(w, http.StatusBadRequest, "ERR", "expected a WebSocket upgrade request")
		return
	}
	if _, ok := w.(http.Hijacker); !ok {
		reply(w, http.StatusHTTPVersionNotSupported, "ERR", "WebSocket needs HTTP/1.1")
		return
	}
	// Counted before the hijack, while Shutdown still waits for this request.
	h.connections.Add(1)
	defer h.connections.Done()
	s := h.newSubscriber(ch)
	websocket.Server{
		// Joining before the 101 is sent makes listeners count a subscriber
		// by the time it can see the upgrade.
		Handshake: func(*websocket.Config, *http.Request) error {
			if !h.join(ch, s) {
				return errors.New("channel deleted or shutting down")
			}
			return nil
		},
		Handler: s.serve,
	}.ServeHTTP(w, r)
	s.stop(farewell{closeGoingAway, "handshake failed", false}) // leaves if serve never ran
}

// fingerprint names a token in logs without revealing any of it: the first
// 6 hex digits of its SHA-256.
func fingerprint(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:3])
}

// ---- main ----

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "gockets:", err)
		os.Exit(exitStatus(err))
	}
}

// exitStatus is 2 for a bad command line, 1 for anything else.
func exitStatus(err error) int {
	var ue usageError
	if errors.As(err, &ue) {
		return 2
	}
	return 1
}

// run is the daemon: it serves until ctx ends, then shuts down gracefully.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	_ = getenv
	cfg, err := parseConfig(args, stdout)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	log := newLogger(stderr, cfg.logLevel)
	h := newHub(cfg, log)
	ln, err := net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(cfg.port)))
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: readHeaderTimeout,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	log.Info("gockets listening", "addr", ln.Addr().String(), "host_name", cfg.hostName, "ping_interval", cfg.pingInterval)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	select {
	case err := <-served:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	h.closeAll()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := h.wait(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	log.Info("stopped")
	return nil
}
