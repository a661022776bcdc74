// Gockets gives request/response backends such as PHP a REST middleware to
// WebSockets. The backend prepares a channel with one HTTP call, hands the
// channel's subscriber token to a browser, and publishes with plain HTTP
// POSTs; what the browser sends back is POSTed to the backend's hook URL.
//
// This file reads top to bottom: flags and config, the hub and its channels,
// the seam where channels live, channels on disk, channels in Redis (several
// nodes), a subscriber's life, hook delivery, HTTP handlers, main.
// README.md has the API.
package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"
	"unsafe"

	"golang.org/x/net/websocket"
)

// ---- Flags and config ----

// version is what -version prints.
const version = "0.4.2"

// Timings and sizes that are not flags, each with its reason.
const (
	// writeWait bounds every write to a subscriber: a peer that takes longer
	// to accept bytes is stuck, and its connection is closed.
	writeWait = 10 * time.Second
	// closeGrace is how long we wait for a peer's close frame after ours
	// before dropping the TCP connection, and how long the write under way
	// and our close frame may still take once a subscriber is dropped: a
	// peer that reads gets its close code within it.
	closeGrace = time.Second
	// drainWait bounds everything written to a subscriber closed in order
	// (channel deleted, shutdown): queued messages start during its first
	// drainWait-closeGrace, the last of them and the close frame get the
	// rest. With closeGrace for the peer's close after it, a subscriber that
	// does not read keeps shutdown waiting drainWait, one that reads slowly
	// drainWait+closeGrace at most: well inside shutdownTimeout.
	drainWait = 2 * time.Second
	// sseHeartbeat is the longest an SSE stream stays silent: proxies close
	// streams idle for a minute (nginx's proxy_read_timeout).
	sseHeartbeat = 30 * time.Second
	// sendQueueLimit is how many messages may wait for one subscriber; a
	// subscriber that falls further behind is disconnected, never waited for.
	sendQueueLimit = 1024
	// hookQueueLimit and hookQueueBytes bound what may wait for the hook
	// from one subscriber (a message bigger than hookQueueBytes alone
	// passes); more is dropped, and counted, rather than held without bound.
	hookQueueLimit = 256
	hookQueueBytes = 4 << 20
	// hookTotalLimit and hookTotalBytes bound what waits for hooks, or is
	// being posted, from all subscribers together: what a client sends,
	// however many connections it opens, costs at most this much memory.
	// hookTotalBytes holds the largest message -max-message-bytes allows.
	hookTotalLimit = 10000
	hookTotalBytes = 64 << 20
	// hookPosts is how many POSTs to hooks may be under way at once, each
	// by one of as many workers; hookPostsPerHost is how many of them may
	// go to one host (scheme, host and port), so that a hook that hangs
	// holds a quarter of them and other hooks keep the rest. They bound
	// the goroutines and connections that hooks cost: at most hookPosts
	// connections in use and hookPosts idle.
	hookPosts        = 32
	hookPostsPerHost = 8
	// journalLimit is how many changes the state journal holds before the
	// snapshot is rewritten and the journal emptied.
	journalLimit = 4096
	// stateRetryMin and stateRetryMax are the pauses between attempts to
	// write the state after a failed write: soon enough to save promptly
	// once space is freed, rare enough not to hammer a full disk.
	stateRetryMin = time.Second
	stateRetryMax = 30 * time.Second
	// shutdownTimeout bounds a graceful shutdown, hook deliveries included.
	shutdownTimeout = 10 * time.Second
	// wsBufferSize is the size of a WebSocket subscriber's read and write
	// buffers, instead of net/http's 4 KiB each: a subscriber mostly idles,
	// frames bigger than the buffer go around it, and 256 bytes hold the 101
	// answer and any control frame.
	wsBufferSize = 256
	// directShare is how many subscribers a publisher writes to before the
	// writes of one publish are split over the cores: a few hundred
	// microseconds of system calls.
	directShare = 128
	// batchBytes is the most a WebSocket writer gathers for one write.
	batchBytes = 64 << 10
	// sendBufferBytes caps the kernel's send buffer of a connection (Linux
	// doubles it for its bookkeeping; left alone it grows to 4 MiB). What
	// the kernel holds is past recall: with this cap a subscriber reading
	// 2 MB/s gets a close frame a quarter of a second after we write it,
	// not two seconds, and a thousand stuck subscribers pin 0.5 GB of
	// kernel memory, not 4 GB. 512 KiB in flight still carry 40 Mbit/s to
	// a peer 100 ms away.
	sendBufferBytes = 256 << 10
	// reservedFiles is how many of the open-files limit the default
	// -max-subscribers leaves to everything that is not a subscriber (half
	// of it when the limit is lower than twice this): admin requests and
	// health checks, hook connections (up to 2 x hookPosts), the listener,
	// the state files, standard streams.
	reservedFiles = 256
	// payloadChunk is the room a subscriber's reader makes for a frame's
	// payload before any of it has arrived; the room then grows, at most
	// doubling, as it fills. A frame header alone can declare a message of
	// -max-message-bytes, and must not cost them.
	payloadChunk = 4 << 10
	// refusalLogEvery spaces the log lines of refused browser origins: a
	// browser hides the 403 from its page, so the log is where a developer
	// looks, and one line per 10 s with a count keeps a flood off the disk.
	refusalLogEvery = 10 * time.Second
)

type config struct {
	port         int
	bind         string
	hostName     string
	logLevel     int
	pingInterval time.Duration

	adminToken     string
	adminAllow     networks
	trustProxy     networks
	allowedOrigins origins
	tlsCert        string
	tlsKey         string

	maxMessageBytes   int64 // a published body, a message from a subscriber
	maxRequestBytes   int64 // the JSON body of prepare and edit
	maxHeaderBytes    int
	readHeaderTimeout time.Duration
	readTimeout       time.Duration
	writeTimeout      time.Duration
	idleTimeout       time.Duration

	hook       hookPolicy
	hookSecret string
	hookEvents bool

	maxSubscribers           int // in all: each holds a file descriptor
	maxSubscribersPerChannel int

	stateFile   string
	redis       *redisOptions // -redis: channels live in Redis, shared by several nodes
	redisPrefix string        // keeps two deployments on one Redis apart
	backlog     int           // messages kept per channel while nobody listens
	backlogTTL  time.Duration // how long they are kept
	channelTTL  time.Duration // idle channels are deleted after this; 0 never

	// Settings no flag reaches, for tests.
	sendQueue   int                          // sendQueueLimit
	shutdown    time.Duration                // shutdownTimeout
	writeSynced func(*os.File, []byte) error // how the state store writes a file
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

// usageError is a bad command line: main exits with status 2 for it.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// envPrefix names the environment variables that set flags: -ping-interval
// is also GOCKETS_PING_INTERVAL. A flag on the command line wins.
const envPrefix = "GOCKETS_"

func envName(flagName string) string {
	return envPrefix + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parseConfig reads the command line, then the environment for the flags
// it did not set. For -h and -version it prints to stdout and returns
// flag.ErrHelp: there is nothing more to do.
func parseConfig(args []string, getenv func(string) string, stdout io.Writer) (config, error) {
	cfg := config{
		hook:        hookPolicy{attempts: 5, backoffMin: 250 * time.Millisecond, backoffMax: 4 * time.Second},
		sendQueue:   sendQueueLimit,
		shutdown:    shutdownTimeout,
		writeSynced: writeSynced,
	}
	var pingSeconds int
	maxSubscribers := defaultMaxSubscribers()
	var showVersion bool
	var redisURL, redisCA string
	fs := flag.NewFlagSet("gockets", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.IntVar(&cfg.port, "port", 8844, "port of the server, 1-65535 (0 picks a free one)")
	fs.StringVar(&cfg.bind, "bind", "", "address of the interface to listen on (default: all)")
	fs.StringVar(&cfg.hostName, "host-name", "localhost", "admin routes answer only requests whose Host is this name (any port)")
	fs.IntVar(&cfg.logLevel, "log-level", 1, "1 info and error, 2 error only, 3 everything with debug")
	fs.IntVar(&pingSeconds, "ping-interval", 60, "seconds between pings, and the time allowed for the pong (1-86400)")
	fs.StringVar(&cfg.adminToken, "admin-token", "", "admin routes require \"Authorization: Bearer TOKEN\" (better set as "+envName("admin-token")+")")
	fs.Var(&cfg.adminAllow, "admin-allow", "admin routes answer only these networks, such as 10.0.0.0/8,127.0.0.1 (default: any)")
	fs.Var(&cfg.trustProxy, "trust-proxy", "proxies whose X-Forwarded-For names the client, for -admin-allow (default: none)")
	fs.Var(&cfg.allowedOrigins, "allowed-origins", "browser origins that may subscribe, such as https://*.example.com,http://localhost:8080 (default: any)")
	fs.StringVar(&cfg.tlsCert, "tls-cert", "", "serve https and wss with this certificate (PEM), with -tls-key")
	fs.StringVar(&cfg.tlsKey, "tls-key", "", "private key (PEM) of -tls-cert")
	fs.Int64Var(&cfg.maxMessageBytes, "max-message-bytes", 1<<20, "largest message either way: a publish body (413 above), a subscriber message (closed with 1009 above)")
	fs.Int64Var(&cfg.maxRequestBytes, "max-request-bytes", 64<<10, "largest body of prepare and edit (413 above)")
	fs.IntVar(&cfg.maxHeaderBytes, "max-header-bytes", 32<<10, "largest request header (431 above)")
	fs.DurationVar(&cfg.readHeaderTimeout, "read-header-timeout", 10*time.Second, "time a client has to send its request headers (stops slowloris)")
	fs.DurationVar(&cfg.readTimeout, "read-timeout", 30*time.Second, "time a client has to send a whole request, body included (not WebSockets)")
	fs.DurationVar(&cfg.writeTimeout, "write-timeout", 30*time.Second, "time to write a reply (not WebSockets)")
	fs.DurationVar(&cfg.idleTimeout, "idle-timeout", 2*time.Minute, "how long an idle keep-alive connection stays open")
	fs.DurationVar(&cfg.hook.timeout, "hook-timeout", 5*time.Second, "time a hook has to answer one POST")
	fs.StringVar(&cfg.hookSecret, "hook-secret", "", "sign every hook request with HMAC-SHA256 under this secret (better set as "+envName("hook-secret")+")")
	fs.Var((*onOff)(&cfg.hookEvents), "hook-events", "also POST a JSON event to the hook when a subscriber connects or disconnects")
	fs.IntVar(&cfg.maxSubscribers, "max-subscribers", maxSubscribers, "subscriber connections in all; more are refused with 503 (default: the open-files limit less room for the admin API and hooks)")
	fs.IntVar(&cfg.maxSubscribersPerChannel, "max-subscribers-per-channel", maxSubscribers, "subscriber connections to one channel; more are refused with 503")
	fs.StringVar(&cfg.stateFile, "state-file", "", "keep the channels in this file so that they survive restarts (default: in memory only)")
	fs.StringVar(&redisURL, "redis", "", "share the channels with other nodes through Redis at redis://[user:password@]host:port/db or rediss:// (better set as "+envName("redis")+"; default: this process only)")
	fs.StringVar(&redisCA, "redis-ca", "", "with rediss://, trust only these certificate authorities (PEM) for Redis's certificate (default: the system's)")
	fs.StringVar(&cfg.redisPrefix, "redis-prefix", "gockets:", "prefix of every Redis key and Pub/Sub channel of this deployment")
	fs.IntVar(&cfg.backlog, "backlog", 100, "messages kept per channel while it has no subscriber, for the next one (0-1000)")
	fs.DurationVar(&cfg.backlogTTL, "backlog-ttl", time.Minute, "how long a kept message waits for a subscriber")
	fs.DurationVar(&cfg.channelTTL, "channel-ttl", 0, "delete a channel after this long without subscriber or publish (0: never)")
	fs.Var((*onOff)(&showVersion), "version", "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: gockets [flags]\n\nEvery flag can also be set in the environment: -ping-interval as %s.\n\nFlags:\n", envName("ping-interval"))
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
	// The environment, for what the command line left alone.
	onCommandLine := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })
	source := map[string]string{} // flag name -> what set it, for messages
	var envErr error
	fs.VisitAll(func(f *flag.Flag) {
		source[f.Name] = "-" + f.Name
		value := getenv(envName(f.Name))
		// GOCKETS_VERSION often names a version to deploy; it is no flag.
		if onCommandLine[f.Name] || value == "" || envErr != nil || f.Name == "version" {
			return
		}
		source[f.Name] = envName(f.Name)
		if err := fs.Set(f.Name, value); err != nil {
			envErr = fmt.Errorf("%s=%q: %w", envName(f.Name), value, err)
		}
	})
	if envErr != nil {
		return cfg, usageError{envErr}
	}
	if showVersion {
		fmt.Fprintln(stdout, "gockets", version)
		return cfg, flag.ErrHelp
	}
	for _, err := range []error{
		inRange(source["port"], cfg.port, 0, 65535),
		inRange(source["log-level"], cfg.logLevel, 1, 3),
		inRange(source["ping-interval"], pingSeconds, 1, 86400),
		inRange(source["max-message-bytes"], cfg.maxMessageBytes, 1, 64<<20),
		inRange(source["max-request-bytes"], cfg.maxRequestBytes, 1<<10, 16<<20),
		inRange(source["max-header-bytes"], cfg.maxHeaderBytes, 1<<10, 1<<20),
		inRange(source["read-header-timeout"], cfg.readHeaderTimeout, time.Millisecond, time.Hour),
		inRange(source["read-timeout"], cfg.readTimeout, time.Millisecond, 24*time.Hour),
		inRange(source["write-timeout"], cfg.writeTimeout, time.Millisecond, 24*time.Hour),
		inRange(source["idle-timeout"], cfg.idleTimeout, time.Millisecond, 24*time.Hour),
		inRange(source["hook-timeout"], cfg.hook.timeout, time.Millisecond, 10*time.Minute),
		inRange(source["backlog"], cfg.backlog, 0, 1000),
		inRange(source["max-subscribers"], cfg.maxSubscribers, 1, 1<<30),
		inRange(source["max-subscribers-per-channel"], cfg.maxSubscribersPerChannel, 1, 1<<30),
		inRange(source["backlog-ttl"], cfg.backlogTTL, time.Millisecond, 7*24*time.Hour),
		inRange(source["channel-ttl"], cfg.channelTTL, 0, 365*24*time.Hour),
	} {
		if err != nil {
			return cfg, usageError{err}
		}
	}
	switch {
	case strings.TrimSpace(cfg.hostName) == "":
		return cfg, usageError{fmt.Errorf("%s must not be empty", source["host-name"])}
	case strings.TrimSpace(cfg.adminToken) != cfg.adminToken:
		// The token a client presents is read trimmed, so this one could
		// never match; trimming it here would change a secret silently.
		return cfg, usageError{fmt.Errorf("%s must not begin or end with white space", source["admin-token"])}
	case (cfg.tlsCert == "") != (cfg.tlsKey == ""):
		return cfg, usageError{errors.New("-tls-cert and -tls-key go together")}
	case cfg.bind != "" && net.ParseIP(cfg.bind) == nil && !validHost(cfg.bind):
		return cfg, usageError{fmt.Errorf("%s %q is not an address", source["bind"], cfg.bind)}
	case redisURL != "" && cfg.stateFile != "":
		return cfg, usageError{fmt.Errorf("%s and %s do not go together: with Redis, Redis is the store now (its own persistence keeps the channels)", source["redis"], source["state-file"])}
	case redisURL != "" && cfg.channelTTL > 0:
		return cfg, usageError{fmt.Errorf("%s is not available with %s yet", source["channel-ttl"], source["redis"])}
	}
	if redisURL != "" {
		opts, err := parseRedisURL(redisURL)
		if err != nil {
			return cfg, usageError{fmt.Errorf("%s: %w", source["redis"], err)}
		}
		cfg.redis = opts
	}
	if redisCA != "" {
		if cfg.redis == nil || !cfg.redis.tls {
			return cfg, usageError{fmt.Errorf("%s is for a rediss:// URL in %s", source["redis-ca"], source["redis"])}
		}
		pool, err := loadCertPool(redisCA)
		if err != nil {
			return cfg, usageError{fmt.Errorf("%s: %w", source["redis-ca"], err)}
		}
		cfg.redis.rootCAs = pool
	}
	cfg.pingInterval = time.Duration(pingSeconds) * time.Second
	return cfg, nil
}

// loadCertPool reads the PEM certificates of a file into a pool of its own.
func loadCertPool(path string) (*x509.CertPool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("no PEM certificate in %s", path)
	}
	return pool, nil
}

// defaultMaxSubscribers leaves reservedFiles of the open-files limit (or
// half of it, when the limit is low) to what is not a subscriber, so that
// the admin API and /healthz answer when subscribers have taken the rest.
func defaultMaxSubscribers() int {
	var limit syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &limit); err != nil || limit.Cur > 1<<30 {
		return 1 << 20 // no limit we can read: the kernel's own will do
	}
	files := int(limit.Cur)
	return max(files-min(files/2, reservedFiles), 1)
}

// inRange refuses a flag value outside [lo, hi], naming the flag or the
// environment variable that set it.
func inRange[T int | int64 | time.Duration](name string, v, lo, hi T) error {
	if v < lo || v > hi {
		return fmt.Errorf("%s %v is out of range: use %v to %v", name, v, lo, hi)
	}
	return nil
}

// onOff is a boolean flag that also takes the yes/no and on/off of
// environment files, besides Go's true/false, 1/0 and t/f.
type onOff bool

func (b *onOff) String() string   { return strconv.FormatBool(bool(*b)) }
func (b *onOff) IsBoolFlag() bool { return true }

func (b *onOff) Set(s string) error {
	switch strings.ToLower(s) {
	case "1", "t", "true", "y", "yes", "on":
		*b = true
	case "0", "f", "false", "n", "no", "off":
		*b = false
	default:
		return errors.New("not a boolean: use true or false, yes or no, on or off, 1 or 0")
	}
	return nil
}

// networks is a flag: a comma-separated list of networks (CIDR) or single
// addresses.
type networks []netip.Prefix

func (n *networks) String() string {
	parts := make([]string, len(*n))
	for i, p := range *n {
		parts[i] = p.String()
	}
	return strings.Join(parts, ",")
}

func (n *networks) Set(list string) error {
	*n = nil
	for _, part := range strings.Split(list, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		if prefix, err := netip.ParsePrefix(part); err == nil {
			*n = append(*n, prefix.Masked())
		} else if addr, err := netip.ParseAddr(part); err == nil {
			*n = append(*n, netip.PrefixFrom(addr.Unmap(), addr.Unmap().BitLen()))
		} else {
			return fmt.Errorf("%q is neither a network (10.0.0.0/8) nor an address", part)
		}
	}
	return nil
}

func (n networks) contain(addr netip.Addr) bool {
	addr = addr.Unmap()
	for _, p := range n {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// origins is a flag: a comma-separated list of allowed browser origins,
// scheme://host[:port], where the host may start with "*." for any
// subdomain. Empty, or "*", allows every origin.
type origins []origin

type origin struct {
	scheme, host, port string // host without "*." when sub
	sub                bool   // host is "*.host": any subdomain of it
}

func (o *origins) String() string {
	parts := make([]string, len(*o))
	for i, p := range *o {
		host := p.host
		if p.sub {
			host = "*." + host
		}
		parts[i] = p.scheme + "://" + net.JoinHostPort(host, p.port)
	}
	return strings.Join(parts, ",")
}

func (o *origins) Set(list string) error {
	*o = nil
	for _, part := range strings.Split(list, ",") {
		switch part = strings.TrimSpace(part); part {
		case "":
			continue
		case "*":
			*o = nil
			return nil
		}
		sub := strings.Contains(part, "://*.")
		pattern, ok := parseOrigin(strings.Replace(part, "://*.", "://", 1))
		if !ok || strings.HasPrefix(pattern.host, ".") || strings.HasSuffix(pattern.host, ".") {
			return fmt.Errorf("%q is not an origin such as https://app.example.com or https://*.example.com", part)
		}
		pattern.sub = sub
		*o = append(*o, pattern)
	}
	return nil
}

// parseOrigin splits an Origin header, filling in the default port.
func parseOrigin(s string) (origin, bool) {
	u, err := url.Parse(s)
	if err != nil || u.Scheme != "http" && u.Scheme != "https" || u.Host == "" || u.Path != "" && u.Path != "/" || u.RawQuery != "" || u.User != nil {
		return origin{}, false
	}
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443"}[u.Scheme]
	}
	return origin{scheme: u.Scheme, host: strings.ToLower(u.Hostname()), port: port}, validHost(u.Hostname())
}

// allow reports whether a browser's Origin header may subscribe. Clients
// that send none (PHP, node, curl) may.
func (o origins) allow(header string) bool {
	if len(o) == 0 || header == "" {
		return true
	}
	got, ok := parseOrigin(header)
	if !ok {
		return false
	}
	for _, p := range o {
		if p.scheme == got.scheme && p.port == got.port &&
			(!p.sub && p.host == got.host || p.sub && strings.HasSuffix(got.host, "."+p.host)) {
			return true
		}
	}
	return false
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
	store *store // nil without -state-file
	stats stats
	// engine is where channels live: here, or in Redis with -redis.
	engine engine

	mu           sync.RWMutex
	byPublisher  map[string]*channel
	bySubscriber map[string]*channel
	prepared     uint64 // channels prepared so far, to list them in order

	bootID           string      // tells this run's hook delivery ids from the last one's
	closing          atomic.Bool // shutdown has begun: no new subscribers
	lastSubscriberID atomic.Uint64
	connections      sync.WaitGroup // one per subscriber connection, from admit to release
	connected        atomic.Int64   // the same, counted: each holds a file descriptor
	hookWork         hookWork
	hookCtx          context.Context
	cancelHooks      context.CancelFunc
	quit             chan struct{}  // closed by stop: the janitor and the store end
	background       sync.WaitGroup // the janitor and the store
	batches          sync.Pool      // of *[]byte, lent to WebSocket writers while they write, and to publish for its reply
	claims           sync.Pool      // of *[]*subscriber, lent to publish
	requests         requestWatch   // what each HTTP connection is doing, for shutdown
	refusedOrigins   logLimit       // spaces the log lines of refused origins
}

// logLimit lets a log line that clients can cause at will through at most
// once per interval, and counts the ones it held back.
type logLimit struct {
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// allow says whether to log now and, if so, how many lines were held back
// since the last one.
func (l *logLimit) allow(now time.Time, interval time.Duration) (ok bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < interval {
		l.suppressed++
		return false, 0
	}
	suppressed, l.last, l.suppressed = l.suppressed, now, 0
	return true, suppressed
}

// stats counts what the daemon does, for /metrics.
type stats struct {
	published, delivered, queued                atomic.Int64
	droppedBacklogFull, droppedExpired          atomic.Int64
	droppedNoSubscriber, droppedSlow            atomic.Int64
	droppedGone                                 atomic.Int64
	slowDisconnects                             atomic.Int64
	hookDelivered, hookRetried, hookFailed      atomic.Int64
	hookQueueFull, hookNoHook, stateSaveFailure atomic.Int64
	hookTotalFull                               atomic.Int64
	refusedDaemonFull, refusedChannelFull       atomic.Int64
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
	backlog     []kept        // the latest messages, oldest first
	lastID      uint64        // of the latest message
	lastActive  time.Time     // last prepare, edit, publish, join or leave
	connected   int           // subscriber connections admitted and not yet closed
	deleted     bool
	shared      *sharedChannel // with -redis: this node's part of a channel in Redis; else nil
}

// message is one published body, read once and shared by every subscriber.
type message struct {
	id     uint64 // increasing per channel
	data   []byte
	binary bool // sent as a binary frame (SSE: base64)
	at     time.Time
	frame  []byte // the WebSocket frame: its header, then data
}

// frameHeadroom is room for the longest header of a frame we send: 2
// bytes, then 8 of length (a server does not mask).
const frameHeadroom = 10

// newMessage makes a message of what follows frameHeadroom bytes in buf,
// and builds its WebSocket frame there, in place: once, the same bytes for
// every subscriber, where x/net/websocket would build it for each.
func newMessage(buf []byte, isBinary bool, at time.Time) *message {
	data := buf[frameHeadroom:]
	opcode := byte(websocket.TextFrame)
	if isBinary {
		opcode = websocket.BinaryFrame
	}
	var header [frameHeadroom]byte
	h := appendFrameHeader(header[:0], opcode, len(data))
	start := frameHeadroom - len(h)
	copy(buf[start:], h)
	return &message{data: data, binary: isBinary, at: at, frame: buf[start:]}
}

// messageOf makes a message of data that was read without headroom (from
// Redis): one copy, for the frame.
func messageOf(data []byte, isBinary bool, at time.Time) *message {
	buf := make([]byte, frameHeadroom+len(data))
	copy(buf[frameHeadroom:], data)
	return newMessage(buf, isBinary, at)
}

// appendFrameHeader appends the header of an unmasked frame that is a whole
// message (RFC 6455, 5.2).
func appendFrameHeader(b []byte, opcode byte, length int) []byte {
	b = append(b, 0x80|opcode) // FIN
	switch {
	case length < 126:
		return append(b, byte(length))
	case length < 1<<16:
		return binary.BigEndian.AppendUint16(append(b, 126), uint16(length))
	}
	return binary.BigEndian.AppendUint64(append(b, 127), uint64(length))
}

// kept is a message in a channel's backlog; delivered once some subscriber
// has it.
type kept struct {
	*message
	delivered bool
}

// newHub makes a hub and loads the channels of -state-file.
func newHub(cfg config, log *slog.Logger) (*hub, error) {
	h := &hub{
		cfg:          cfg,
		log:          log,
		byPublisher:  make(map[string]*channel),
		bySubscriber: make(map[string]*channel),
		hooks: &http.Client{
			Transport: &http.Transport{
				Proxy:               http.ProxyFromEnvironment,
				DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
				MaxConnsPerHost:     hookPostsPerHost,
				MaxIdleConns:        hookPosts,
				MaxIdleConnsPerHost: hookPostsPerHost,
				IdleConnTimeout:     90 * time.Second,
			},
			Timeout: cfg.hook.timeout,
			// A hook answers; it does not send us elsewhere.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		quit:   make(chan struct{}),
		bootID: rand.Text()[:8],
	}
	h.hookCtx, h.cancelHooks = context.WithCancel(context.Background())
	h.hookWork.inFlight = make(map[string]int)
	h.batches.New = func() any { return new([]byte) }
	h.claims.New = func() any { return new([]*subscriber) }
	h.mux = h.routes()
	h.engine = memoryEngine{h}
	if cfg.redis != nil {
		r, err := newRedisEngine(h)
		if err != nil {
			return nil, err
		}
		h.engine = r
		// The backlog lives in Redis: the hub keeps none of its own.
		h.cfg.backlog = 0
	}
	if cfg.stateFile != "" {
		st, saved, err := openStore(cfg.stateFile, cfg.writeSynced, log, &h.stats)
		if err != nil {
			return nil, err
		}
		h.store = st
		st.snapshot = h.snapshot
		for _, sc := range saved {
			h.insert(newChannel(sc.PublisherToken, sc.SubscriberToken, sc.HookURL, sc.Tag))
		}
		log.Info("channels loaded", "channels", len(saved), "state_file", cfg.stateFile)
	}
	return h, nil
}

// start runs the janitor and the store (or the Redis connections) until
// stop.
func (h *hub) start() {
	if h.store != nil {
		h.background.Go(func() { h.store.run(h.quit) })
	}
	if r, ok := h.engine.(*redisEngine); ok {
		r.start()
	}
	if tick := h.janitorInterval(); tick > 0 {
		h.background.Go(func() { h.janitor(tick) })
	}
}

// discard lets go of what newHub holds for a hub that will never start (the
// listen failed): the state file's lock and journal, the Redis connection
// made to check the URL.
func (h *hub) discard() {
	h.cancelHooks()
	if h.store != nil {
		if err := errors.Join(h.store.journal.Close(), h.store.lock.Close()); err != nil {
			h.log.Warn("close state files", "err", err)
		}
	}
	if r, ok := h.engine.(*redisEngine); ok {
		r.cancel()
		if r.first != nil {
			if err := r.first.Close(); err != nil {
				h.log.Debug("close the Redis connection", "err", err)
			}
		}
	}
}

// stop ends the janitor and the store; the store writes its last snapshot.
func (h *hub) stop() {
	close(h.quit)
	h.background.Wait()
}

// newToken returns 130 random bits from crypto/rand in base32: URL-safe and
// unguessable. The two tokens of a channel are drawn independently.
func newToken() string { return rand.Text() }

func newChannel(publisherToken, subscriberToken string, hookURL, tag *string) *channel {
	now := time.Now()
	ch := &channel{publisherToken: publisherToken, subscriberToken: subscriberToken, tag: tag, lastActive: now}
	if hookURL != nil {
		ch.hookURL = hookURL
		ch.hookTarget, _ = hookTarget(*hookURL) // checked when it was set
	}
	// Message ids keep growing across restarts, for SSE's Last-Event-ID.
	ch.lastID = uint64(now.UnixMicro())
	return ch
}

// insert adds a channel; the caller holds h.mu or is alone with the hub.
func (h *hub) insert(ch *channel) {
	h.prepared++
	ch.seq = h.prepared
	h.byPublisher[ch.publisherToken] = ch
	h.bySubscriber[ch.subscriberToken] = ch
}

// prepare creates a channel with fresh tokens. The store position it
// returns is the change to wait for before answering.
func (h *hub) prepare(opts channelOptions) (*channel, uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var pub, sub string
	for {
		pub, sub = newToken(), newToken()
		if h.byPublisher[pub] == nil && h.bySubscriber[sub] == nil {
			break
		}
	}
	ch := newChannel(pub, sub, nil, nil)
	opts.applyTo(ch)
	h.insert(ch)
	return ch, h.store.put(ch)
}

// edit changes a channel's hook URL and tag.
func (h *hub) edit(ch *channel, opts channelOptions) (uint64, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.byPublisher[ch.publisherToken] != ch {
		return 0, false
	}
	ch.mu.Lock()
	opts.applyTo(ch)
	ch.lastActive = time.Now()
	ch.mu.Unlock()
	return h.store.put(ch), true
}

// delete removes a channel and closes its subscribers with 1000. It waits
// for nothing: each subscriber's writer sends the close frame on its own.
// With idle > 0 it deletes only a channel that has had no subscriber and
// no publish for that long, checked under the same lock as the deletion.
func (h *hub) delete(ch *channel, bye farewell, idle time.Duration) (uint64, bool) {
	h.mu.Lock()
	if h.byPublisher[ch.publisherToken] != ch {
		h.mu.Unlock()
		return 0, false
	}
	ch.mu.Lock()
	if idle > 0 && (len(ch.subscribers) > 0 || time.Since(ch.lastActive) <= idle) {
		ch.mu.Unlock()
		h.mu.Unlock()
		return 0, false
	}
	delete(h.byPublisher, ch.publisherToken)
	delete(h.bySubscriber, ch.subscriberToken)
	seq := h.store.remove(ch.storedLocked())
	ch.deleted = true
	subs := ch.subscribers
	ch.subscribers, ch.backlog = nil, nil
	for _, s := range subs {
		s.index = -1
	}
	ch.mu.Unlock()
	h.mu.Unlock()
	for _, s := range subs {
		s.stop(bye)
	}
	return seq, true
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

// all returns every channel, in no order.
func (h *hub) all() []*channel {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return slices.Collect(maps.Values(h.byPublisher))
}

// oldestFirst sorts channels in the order they were prepared.
func oldestFirst(all []*channel) []*channel {
	slices.SortFunc(all, func(a, b *channel) int { return cmp.Compare(a.seq, b.seq) })
	return all
}

// channels lists the channels whose tag matches, or all when match is nil,
// oldest first.
func (h *hub) channels(match *regexp.Regexp) []channelJSON {
	list := []channelJSON{}
	for _, ch := range oldestFirst(h.all()) {
		view := ch.view()
		if match == nil || view.Tag != nil && match.MatchString(*view.Tag) {
			list = append(list, view)
		}
	}
	return list
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
// every queued hook delivery to finish; then it abandons what is left and
// says what that is.
func (h *hub) wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		h.connections.Wait()
		h.hookWork.running.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	select {
	case <-done: // both were ready: nothing is abandoned
		return nil
	default:
	}
	h.cancelHooks()
	var left []string
	if n := h.connected.Load(); n > 0 {
		left = append(left, fmt.Sprintf("%d subscriber connection(s) still open", n))
	}
	if n := h.pendingHooks(); n > 0 {
		left = append(left, fmt.Sprintf("%d hook delivery(ies) not done", n))
	}
	if len(left) == 0 { // they ended as time ran out
		return nil
	}
	return fmt.Errorf("abandoned %s: %w", strings.Join(left, " and "), ctx.Err())
}

// publish hands a message to every subscriber of the channel, or keeps it
// for the next one when there is none. A subscriber with nothing queued and
// no write under way is written to here, by the publisher (offer); the
// others get it queued for their writer. A subscriber whose queue is full
// is disconnected, never waited for. publish returns once the direct
// writes are done, so that fan-outs of one channel do not overlap.
//
// With later, m is queued for every subscriber instead, and the writers to
// start are added to *later rather than started: the caller starts them
// (startWriters) once it has queued all the messages it has at once
// (announcements read from Redis together), so that each writer sends them
// in one write rather than the publisher making one per message.
func (h *hub) publish(ch *channel, m *message, later *[]*subscriber) (subscribers int, queued, ok bool) {
	var slow []*subscriber
	claims := h.claims.Get().(*[]*subscriber)
	defer func() {
		clear(*claims)
		*claims = (*claims)[:0]
		h.claims.Put(claims)
	}()
	ch.mu.Lock()
	if ch.deleted {
		ch.mu.Unlock()
		return 0, false, false
	}
	ch.lastID++
	m.id, ch.lastActive = ch.lastID, m.at
	if m.frame == nil { // made without newMessage or messageOf: subscribers would get nothing
		m.frame = messageOf(m.data, m.binary, m.at).frame
	}
	for i := 0; i < len(ch.subscribers); i++ {
		s := ch.subscribers[i]
		switch s.offer(m, later) {
		case claimed:
			*claims = append(*claims, s)
			subscribers++
		case enqueued:
			subscribers++
		case full:
			ch.removeLocked(s) // once: a concurrent publish does not see it again
			slow = append(slow, s)
			i-- // the last subscriber took its place
		}
	}
	if h.cfg.backlog > 0 {
		queued = subscribers == 0
		ch.keep(kept{m, !queued}, h.cfg.backlog, &h.stats)
	}
	ch.mu.Unlock()
	h.writeDirect(*claims, m)

	h.stats.published.Add(1)
	switch {
	case queued:
		h.stats.queued.Add(1)
	case subscribers == 0:
		h.stats.droppedNoSubscriber.Add(1)
	}
	for _, s := range slow {
		s.log().Warn("subscriber too slow: disconnected", "queued", h.cfg.sendQueue)
		h.stats.slowDisconnects.Add(1)
		s.stop(farewell{closePolicyViolation, "too slow: send queue full", false})
	}
	return subscribers, queued, true
}

// writeDirect writes m to the subscribers a publish claimed, split over
// the cores when there are many.
func (h *hub) writeDirect(claimed []*subscriber, m *message) {
	if len(claimed) < 2*directShare { // most publishes: GOMAXPROCS takes the scheduler's lock
		h.stats.delivered.Add(writeEach(claimed, m))
		return
	}
	parts := min(runtime.GOMAXPROCS(0), len(claimed)/directShare)
	per := (len(claimed) + parts - 1) / parts
	var wg sync.WaitGroup
	for part := range slices.Chunk(claimed[per:], per) {
		wg.Go(func() { h.stats.delivered.Add(writeEach(part, m)) })
	}
	h.stats.delivered.Add(writeEach(claimed[:per], m))
	wg.Wait()
}

func writeEach(claimed []*subscriber, m *message) int64 {
	var whole int64
	for _, s := range claimed {
		if s.writeClaimed(m) {
			whole++
		}
	}
	return whole
}

// keep adds a message to the backlog, dropping the oldest beyond limit.
// The caller holds ch.mu.
func (ch *channel) keep(k kept, limit int, st *stats) {
	if len(ch.backlog) >= limit {
		if !ch.backlog[0].delivered {
			st.droppedBacklogFull.Add(1)
		}
		ch.backlog[0] = kept{}
		ch.backlog = ch.backlog[1:]
	}
	ch.backlog = append(ch.backlog, k)
}

// expire drops backlog messages older than ttl. The caller holds ch.mu.
func (ch *channel) expire(now time.Time, ttl time.Duration, st *stats) {
	n := 0
	for n < len(ch.backlog) && now.Sub(ch.backlog[n].at) > ttl {
		if !ch.backlog[n].delivered {
			st.droppedExpired.Add(1)
		}
		ch.backlog[n] = kept{}
		n++
	}
	ch.backlog = ch.backlog[n:]
	if len(ch.backlog) == 0 {
		ch.backlog = nil
	}
}

// join adds a subscriber and hands it what waited in the backlog: what no
// subscriber has had yet, or, for an SSE client that resumes, everything
// after the last id it saw. It fails when the channel is gone
// (errNotFound) or we shut down (errShuttingDown). closing is read under
// ch.mu, which closeAll takes after setting it, so a subscriber either
// sees it or is seen by closeAll. The connect presence event is queued
// here, under ch.mu, so that it comes before any disconnect.
func (h *hub) join(ch *channel, s *subscriber, resume bool, lastID uint64) error {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if h.closing.Load() {
		return errShuttingDown
	}
	if ch.deleted {
		return errNotFound
	}
	now := time.Now()
	ch.expire(now, h.cfg.backlogTTL, &h.stats)
	for i, k := range ch.backlog {
		if (resume && k.id > lastID || !resume && !k.delivered) && s.enqueue(k.message) {
			ch.backlog[i].delivered = true
			s.fromBacklog = append(s.fromBacklog, k.message)
		}
	}
	s.index, s.joined = len(ch.subscribers), true
	ch.subscribers = append(ch.subscribers, s)
	ch.lastActive = now
	s.presence("connect", len(ch.subscribers), nil, ch.hookTarget)
	return nil
}

// unjoin undoes join for a subscriber whose upgrade failed after it: it
// leaves, and what it took from the backlog waits for the next one again.
func (h *hub) unjoin(ch *channel, s *subscriber) {
	s.stop(farewell{closeGoingAway, "handshake failed", false})
	ch.mu.Lock()
	defer ch.mu.Unlock()
	for i, k := range ch.backlog {
		if slices.Contains(s.fromBacklog, k.message) {
			ch.backlog[i].delivered = false
		}
	}
}

// leave removes a subscriber, if still there, so listeners is exact, and
// returns the listeners left.
func (ch *channel) leave(s *subscriber) int {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	ch.removeLocked(s)
	return len(ch.subscribers)
}

// removeLocked takes s out of the subscribers, if there; the caller holds
// ch.mu.
func (ch *channel) removeLocked(s *subscriber) {
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
	ch.lastActive = time.Now()
	if ch.shared != nil {
		ch.shared.countChangedLocked(ch)
	}
}

// hookDestination is where frames from this channel's subscribers go now.
func (ch *channel) hookDestination() string {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.hookTarget
}

// janitorInterval is how often expired backlog and idle channels are
// looked for: often enough to honour the shortest TTL within a quarter.
func (h *hub) janitorInterval() time.Duration {
	ttl := h.cfg.backlogTTL
	if h.cfg.channelTTL > 0 {
		ttl = min(ttl, h.cfg.channelTTL)
	}
	return min(max(ttl/4, 10*time.Millisecond), time.Minute)
}

// janitor drops expired backlog messages and deletes idle channels.
func (h *hub) janitor(tick time.Duration) {
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-h.quit:
			return
		case now := <-t.C:
			h.sweep(now)
		}
	}
}

func (h *hub) sweep(now time.Time) {
	for _, ch := range h.all() {
		ch.mu.Lock()
		ch.expire(now, h.cfg.backlogTTL, &h.stats)
		idle := now.Sub(ch.lastActive)
		expired := h.cfg.channelTTL > 0 && len(ch.subscribers) == 0 && idle > h.cfg.channelTTL
		ch.mu.Unlock()
		if !expired {
			continue
		}
		// Nobody waits for this change to reach the disk: the store saves it
		// with the next one, or at shutdown.
		if _, ok := h.delete(ch, farewell{closeNormal, "channel expired", true}, h.cfg.channelTTL); ok {
			h.log.Info("channel expired", "channel", fingerprint(ch.subscriberToken), "idle", idle.Round(time.Millisecond))
		}
	}
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

// parseChannelOptions reads a prepare or edit body. An empty body, {} and []
// (what PHP's json_encode makes of an empty array) mean no options.
func parseChannelOptions(body []byte) (channelOptions, error) {
	var opts channelOptions
	body = bytes.TrimSpace(body)
	if len(body) == 0 || bytes.Equal(body, []byte("[]")) {
		return opts, nil
	}
	// A map, not a struct: encoding/json would match a struct's field
	// names in any case, and the README promises that a name it does not
	// know exactly is refused.
	var fields map[string]json.RawMessage
	if err := decodeStrict(body, &fields); err != nil {
		return opts, fmt.Errorf("body is not a valid JSON object: %w", err)
	}
	for _, name := range slices.Sorted(maps.Keys(fields)) {
		if name != "subscriber_message_hook_url" && name != "tag" {
			return opts, fmt.Errorf("body is not a valid JSON object: json: unknown field %q", name)
		}
	}
	var err error
	if opts.hookURL, opts.setHook, err = optionalString("subscriber_message_hook_url", fields["subscriber_message_hook_url"]); err != nil {
		return opts, err
	}
	if opts.tag, opts.setTag, err = optionalString("tag", fields["tag"]); err != nil {
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

// ---- The seam: where channels live ----

// engine is everything the routes do to channels. memoryEngine keeps them
// in this process (the hub above, with -state-file on disk); redisEngine
// keeps them in Redis, shared by every node on it. Handlers, subscribers
// and hooks do not know which one runs: a subscriber always joins a
// *channel of this process, which holds this node's subscribers of it.
//
// What holds with either engine:
//   - A change (prepare, edit, delete) that returned nil holds for the very
//     next call, on any node.
//   - Every subscriber of a channel gets its messages once each, in one
//     order, the same for all subscribers: publish order (with Redis, the
//     order in which Redis took them, whichever node they came through).
//   - A subscriber gets what was kept for it (published while the channel
//     had no subscriber, not yet handed to one, within -backlog and
//     -backlog-ttl), then every message published after its join: a
//     publish that races with a join is either kept and handed over at the
//     join, or delivered live, never both and never neither. With Redis a
//     join counts as a subscriber for every publish that Redis takes after
//     it; one that leaves still counts for publishes already under way.
//   - Errors: errNotFound for an unknown token; any other error means the
//     change could not be made durable (state file) or could not reach
//     Redis, and is answered 503. A publish answered 503 may still reach
//     subscribers (Redis took it, its answer did not come back in time); one
//     answered 200 is never lost while Redis keeps its data.
type engine interface {
	prepare(ctx context.Context, opts channelOptions) (channelJSON, error)
	show(ctx context.Context, publisherToken string) (channelJSON, error)
	list(ctx context.Context, match *regexp.Regexp) ([]channelJSON, error)
	edit(ctx context.Context, publisherToken string, opts channelOptions) (channelJSON, error)
	// publish says how many subscribers the message was handed to (with
	// Redis, the last known count across nodes), or that it was kept.
	publish(ctx context.Context, publisherToken string, m *message) (subscribers int, queued bool, err error)
	// remove deletes a channel and closes its subscribers, on every node,
	// with 1000; it returns the subscriber token, for the log.
	remove(ctx context.Context, publisherToken string) (subscriberToken string, err error)
	// find returns this process's channel for a subscriber token, to join.
	find(ctx context.Context, subscriberToken string) (*channel, error)
	// join adds a subscriber and hands it what waited for it; errNotFound
	// when the channel is gone, errShuttingDown, or why Redis did not.
	join(ch *channel, s *subscriber, resume bool, lastID uint64) error
	unjoin(ch *channel, s *subscriber)
	// health is nil while the engine can serve every route.
	health() error
}

var (
	errNotFound     = errors.New("token not found")
	errShuttingDown = errors.New("shutting down")
)

// memoryEngine is the hub itself: channels in this process only.
type memoryEngine struct{ h *hub }

func (e memoryEngine) prepare(ctx context.Context, opts channelOptions) (channelJSON, error) {
	ch, seq := e.h.prepare(opts)
	return ch.view(), e.h.durable(ctx, seq)
}

func (e memoryEngine) show(_ context.Context, token string) (channelJSON, error) {
	ch := e.h.byPublisherToken(token)
	if ch == nil {
		return channelJSON{}, errNotFound
	}
	return ch.view(), nil
}

func (e memoryEngine) list(_ context.Context, match *regexp.Regexp) ([]channelJSON, error) {
	return e.h.channels(match), nil
}

func (e memoryEngine) edit(ctx context.Context, token string, opts channelOptions) (channelJSON, error) {
	ch := e.h.byPublisherToken(token)
	if ch == nil {
		return channelJSON{}, errNotFound
	}
	seq, ok := e.h.edit(ch, opts)
	if !ok {
		return channelJSON{}, errNotFound
	}
	return ch.view(), e.h.durable(ctx, seq)
}

func (e memoryEngine) publish(_ context.Context, token string, m *message) (int, bool, error) {
	ch := e.h.byPublisherToken(token)
	if ch == nil {
		return 0, false, errNotFound
	}
	n, queued, ok := e.h.publish(ch, m, nil)
	if !ok {
		return 0, false, errNotFound
	}
	return n, queued, nil
}

func (e memoryEngine) remove(ctx context.Context, token string) (string, error) {
	ch := e.h.byPublisherToken(token)
	if ch == nil {
		return "", errNotFound
	}
	seq, ok := e.h.delete(ch, farewell{closeNormal, "channel deleted", true}, 0)
	if !ok {
		return "", errNotFound
	}
	return ch.subscriberToken, e.h.durable(ctx, seq)
}

func (e memoryEngine) find(_ context.Context, token string) (*channel, error) {
	if ch := e.h.bySubscriberToken(token); ch != nil {
		return ch, nil
	}
	return nil, errNotFound
}

func (e memoryEngine) join(ch *channel, s *subscriber, resume bool, lastID uint64) error {
	return e.h.join(ch, s, resume, lastID)
}

func (e memoryEngine) unjoin(ch *channel, s *subscriber) { e.h.unjoin(ch, s) }

func (e memoryEngine) health() error { return nil }

// durable waits until change seq is on disk; the change stays in memory
// and is saved when the disk allows.
func (h *hub) durable(ctx context.Context, seq uint64) error {
	if err := h.store.wait(ctx, seq); err != nil {
		return fmt.Errorf("done in memory but not saved to the state file, it will be when the disk allows: %w", err)
	}
	return nil
}

// ---- Channels on disk ----

// store keeps the channels in -state-file so that a restart, kill -9
// included, loses none. The file is a snapshot, rewritten atomically (temp
// file, fsync, rename); each change since is appended to a journal beside
// it and fsynced before the change is answered. Changes that arrive
// together share one fsync, and the snapshot is rewritten only when the
// journal has grown long, so 10,000 prepares do not write 10,000 files.
type store struct {
	path        string // the snapshot; the journal is path + ".journal"
	log         *slog.Logger
	stats       *stats
	writeSynced func(*os.File, []byte) error
	snapshot    func() snapshot // the hub's channels and the last change they include

	// Owned by the run goroutine.
	lock     *os.File // PATH.lock, held while the store lives
	journal  *os.File
	appended int  // changes in the journal
	torn     bool // a journal write failed: rewrite the snapshot before appending again

	mu      sync.Mutex
	pending []record      // changes not yet on disk, in order
	last    uint64        // the last change handed to the store
	durable uint64        // every change up to this one is on disk
	failure error         // why the last write failed; nil once one succeeds
	written chan struct{} // closed and replaced after every write
	wake    chan struct{}
}

// snapshot is the state file.
type snapshot struct {
	Version  int             `json:"version"`
	Seq      uint64          `json:"seq"` // the last change it includes
	Channels []storedChannel `json:"channels"`
}

// record is one line of the journal: a channel's new state, or its deletion.
type record struct {
	Seq     uint64        `json:"seq"`
	Delete  bool          `json:"delete,omitempty"`
	Channel storedChannel `json:"channel"`
}

type storedChannel struct {
	PublisherToken  string  `json:"publisher_token"`
	SubscriberToken string  `json:"subscriber_token"`
	HookURL         *string `json:"subscriber_message_hook_url"`
	Tag             *string `json:"tag"`
}

// openStore loads the channels of path and its journal. A missing file is
// an empty state; one that cannot be read or parsed is an error, never
// silently an empty state. It writes nothing that needs free space: a
// daemon restarted on a full disk serves what it read, and the store
// writes when it can.
func openStore(path string, writeSynced func(*os.File, []byte) error, log *slog.Logger, st *stats) (*store, []storedChannel, error) {
	lock, err := lockState(path)
	if err != nil {
		return nil, nil, err
	}
	removeLeftovers(path, log)
	loaded, err := loadState(path, log)
	if err != nil {
		lock.Close()
		return nil, nil, err
	}
	journal, err := os.OpenFile(path+".journal", os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err == nil {
		// A line cut short was never acknowledged; what follows it must
		// start on a line of its own.
		err = journal.Truncate(loaded.journalBytes)
	}
	if err != nil {
		lock.Close()
		return nil, nil, fmt.Errorf("open state journal: %w", err)
	}
	return &store{
		path: path, log: log, stats: st, writeSynced: writeSynced, lock: lock, journal: journal,
		appended: loaded.journalRecords,
		last:     loaded.seq, durable: loaded.seq, written: make(chan struct{}), wake: make(chan struct{}, 1),
	}, loaded.channels, nil
}

// removeLeftovers deletes the temporary snapshots (PATH.tmpNNN) that a
// crash during a rewrite leaves behind: they hold tokens, and nothing
// reads them. The caller holds PATH.lock, so none is being written.
func removeLeftovers(path string, log *slog.Logger) {
	prefix := filepath.Base(path) + ".tmp"
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		log.Warn("cannot look for leftover state files", "err", err)
		return
	}
	for _, e := range entries {
		suffix, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok || suffix == "" || strings.Trim(suffix, "0123456789") != "" {
			continue
		}
		if err := os.Remove(filepath.Join(filepath.Dir(path), e.Name())); err != nil {
			log.Warn("cannot remove a leftover state file", "file", e.Name(), "err", err)
		} else {
			log.Info("removed a state file left by a crash", "file", e.Name())
		}
	}
}

// lockState takes PATH.lock for as long as this process lives: a second
// daemon on the same state would overwrite the first one's files.
func lockState(path string) (*os.File, error) {
	lock, err := os.OpenFile(path+".lock", os.O_RDWR|os.O_CREATE, 0o600)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("lock state file: directory %s does not exist (create it, mode 0700)", filepath.Dir(path))
	} else if err != nil {
		return nil, fmt.Errorf("lock state file: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("state file %s is in use by another gockets (%s.lock is locked): %w", path, path, err)
	}
	return lock, nil
}

// loadedState is what loadState read.
type loadedState struct {
	channels       []storedChannel
	seq            uint64 // the last change they include
	journalBytes   int64  // up to the end of the last whole line
	journalRecords int    // whole lines in the journal
}

// loadState reads the snapshot and replays the journal over it.
func loadState(path string, log *slog.Logger) (loadedState, error) {
	var snap snapshot
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		snap.Version = 1
	case err != nil:
		return loadedState{}, fmt.Errorf("read state file: %w", err)
	default:
		if err := decodeStrict(data, &snap); err != nil {
			return loadedState{}, fmt.Errorf("state file %s is corrupt: %w", path, err)
		}
		if snap.Version != 1 {
			return loadedState{}, fmt.Errorf("state file %s has version %d; this daemon reads version 1", path, snap.Version)
		}
	}
	loaded := loadedState{channels: snap.Channels, seq: snap.Seq}
	channels := snap.Channels
	journal, err := os.ReadFile(path + ".journal")
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return loadedState{}, fmt.Errorf("read state journal: %w", err)
	}
	for n, line := range bytes.SplitAfter(journal, []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		if line[len(line)-1] != '\n' { // a write cut short: never acknowledged
			log.Warn("state journal ends in a partial line; ignoring it", "line", n+1)
			break
		}
		loaded.journalBytes += int64(len(line))
		loaded.journalRecords++
		var r record
		if err := decodeStrict(line, &r); err != nil {
			return loadedState{}, fmt.Errorf("state journal %s.journal is corrupt at line %d: %w", path, n+1, err)
		}
		if r.Seq <= loaded.seq {
			continue
		}
		loaded.seq = r.Seq
		i := slices.IndexFunc(channels, func(c storedChannel) bool { return c.PublisherToken == r.Channel.PublisherToken })
		switch {
		case r.Delete && i >= 0:
			channels = slices.Delete(channels, i, i+1)
		case !r.Delete && i >= 0:
			channels[i] = r.Channel
		case !r.Delete:
			channels = append(channels, r.Channel)
		}
	}
	if err := checkChannels(channels); err != nil {
		return loadedState{}, fmt.Errorf("state file %s is corrupt: %w", path, err)
	}
	loaded.channels = channels
	return loaded, nil
}

// checkChannels refuses what the daemon could not have written.
func checkChannels(channels []storedChannel) error {
	seen := make(map[string]bool, 2*len(channels))
	for i, c := range channels {
		for _, token := range []string{c.PublisherToken, c.SubscriberToken} {
			if token == "" || seen[token] {
				return fmt.Errorf("channel %d: empty or repeated token", i+1)
			}
			seen[token] = true
		}
		if c.HookURL != nil {
			if _, err := hookTarget(*c.HookURL); err != nil {
				return fmt.Errorf("channel %d: %w", i+1, err)
			}
		}
	}
	return nil
}

func decodeStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	// Only JSON's white space may follow (dec.More misses a stray ] or }).
	if len(bytes.Trim(data[dec.InputOffset():], " \t\r\n")) > 0 {
		return errors.New("data after the JSON value")
	}
	return nil
}

// writeSnapshot replaces path atomically: a reader (or a restart after a
// crash) sees the old file or the new one, never a mix.
func writeSnapshot(path string, snap snapshot, writeSynced func(*os.File, []byte) error) error {
	if snap.Channels == nil {
		snap.Channels = []storedChannel{}
	}
	data, err := json.MarshalIndent(snap, "", " ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*") // mode 0600: tokens are secrets
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("write state file: directory %s does not exist (create it, mode 0700)", filepath.Dir(path))
	} else if err != nil {
		return fmt.Errorf("write state file: %w", err)
	}
	defer os.Remove(tmp.Name()) // fails once renamed, as it should
	if err := writeSynced(tmp, append(data, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("write state file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write state file: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("replace state file: %w", err)
	}
	return syncDir(filepath.Dir(path))
}

// writeSynced writes data and waits until it is on disk.
func writeSynced(f *os.File, data []byte) error {
	if _, err := f.Write(data); err != nil {
		return err
	}
	return f.Sync()
}

// syncDir makes a rename in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync state directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync state directory: %w", err)
	}
	return nil
}

// put records a channel's state and remove its deletion; the caller holds
// h.mu, so that changes reach the store in the order they were made. Both
// return the position to wait for; on a nil store, 0.
func (st *store) put(ch *channel) uint64 {
	if st == nil {
		return 0
	}
	return st.add(record{Channel: ch.stored()})
}

func (st *store) remove(sc storedChannel) uint64 {
	if st == nil {
		return 0
	}
	return st.add(record{Delete: true, Channel: sc})
}

func (st *store) add(r record) uint64 {
	st.mu.Lock()
	st.last++
	r.Seq = st.last
	st.pending = append(st.pending, r)
	st.mu.Unlock()
	select {
	case st.wake <- struct{}{}:
	default:
	}
	return r.Seq
}

func (ch *channel) stored() storedChannel {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.storedLocked()
}

func (ch *channel) storedLocked() storedChannel {
	return storedChannel{ch.publisherToken, ch.subscriberToken, ch.hookURL, ch.tag}
}

// lastSeq is the last change handed to the store.
func (st *store) lastSeq() uint64 {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.last
}

// wait returns once change seq is on disk, or the error that keeps it off:
// while writes fail, at once, as the next attempt is a backoff away.
func (st *store) wait(ctx context.Context, seq uint64) error {
	if st == nil {
		return nil
	}
	for {
		st.mu.Lock()
		durable, failure, written := st.durable, st.failure, st.written
		st.mu.Unlock()
		switch {
		case durable >= seq:
			return nil
		case failure != nil:
			return failure
		}
		select {
		case <-written:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// run writes changes as they come until quit; then it writes a last
// snapshot. After a failed write (a full disk) it alone tries again, with
// growing pauses, writing everything that came meanwhile at once; the
// failure is logged when it begins and when it ends, not at every change.
func (st *store) run(quit <-chan struct{}) {
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	var backoff time.Duration // 0 while writes succeed
	failures := 0
	for {
		select {
		case <-st.wake:
			if backoff > 0 {
				continue // the retry writes this change too
			}
		case <-retry.C:
		case <-quit:
			if err := st.save(true); err != nil {
				st.log.Error("last state save failed", "err", err)
			}
			if err := errors.Join(st.journal.Close(), st.lock.Close()); err != nil {
				st.log.Error("close state files", "err", err)
			}
			return
		}
		err := st.save(false)
		switch {
		case err != nil:
			st.stats.stateSaveFailure.Add(1)
			failures++
			if backoff == 0 {
				backoff = stateRetryMin
				st.log.Error("state not saved; channels are kept in memory, trying again until it succeeds", "err", err, "next_try_in", backoff)
			} else {
				backoff = min(2*backoff, stateRetryMax)
				st.log.Debug("state still not saved", "err", err, "next_try_in", backoff)
			}
			retry.Reset(backoff)
		case backoff > 0:
			st.log.Info("state saved again", "failed_writes", failures)
			backoff, failures = 0, 0
		}
	}
}

// save writes the pending changes: appended to the journal, or as a new
// snapshot when the journal is long, torn, or this is the last save.
func (st *store) save(last bool) error {
	st.mu.Lock()
	batch := st.pending
	st.pending = nil
	st.mu.Unlock()
	if len(batch) == 0 && !last && !st.torn {
		return nil
	}
	var through uint64
	var err error
	if last || st.torn || st.appended+len(batch) > journalLimit {
		through, err = st.rewrite()
	} else {
		through, err = batch[len(batch)-1].Seq, st.append(batch)
	}

	st.mu.Lock()
	defer st.mu.Unlock()
	if err != nil {
		st.pending = append(batch, st.pending...)
		st.failure = err
	} else {
		st.durable = max(st.durable, through)
		st.pending = slices.DeleteFunc(st.pending, func(r record) bool { return r.Seq <= through })
		st.failure = nil
	}
	close(st.written)
	st.written = make(chan struct{})
	return err
}

func (st *store) append(batch []record) error {
	var buf bytes.Buffer
	for _, r := range batch {
		line, err := json.Marshal(r)
		if err != nil {
			return fmt.Errorf("encode state change: %w", err)
		}
		buf.Write(append(line, '\n'))
	}
	if err := st.writeSynced(st.journal, buf.Bytes()); err != nil {
		st.torn = true // part of it may be there
		return fmt.Errorf("append to state journal: %w", err)
	}
	st.appended += len(batch)
	return nil
}

// rewrite replaces the snapshot with the hub's channels and empties the
// journal; it returns the last change the snapshot includes.
func (st *store) rewrite() (uint64, error) {
	snap := st.snapshot()
	if err := writeSnapshot(st.path, snap, st.writeSynced); err != nil {
		return snap.Seq, err
	}
	if err := st.journal.Truncate(0); err != nil {
		return snap.Seq, fmt.Errorf("empty state journal: %w", err)
	}
	st.appended, st.torn = 0, false
	return snap.Seq, nil
}

// snapshot is what the store writes: the channels and the last change they
// include, read together under h.mu.
func (h *hub) snapshot() snapshot {
	h.mu.RLock()
	defer h.mu.RUnlock()
	snap := snapshot{Version: 1, Seq: h.store.lastSeq()}
	for _, ch := range oldestFirst(slices.Collect(maps.Values(h.byPublisher))) {
		snap.Channels = append(snap.Channels, ch.stored())
	}
	return snap
}

// ---- Channels in Redis: several nodes ----

// With -redis, channels live in Redis and every node serves every channel.
// Redis holds, under -redis-prefix (P):
//
//	P:ch:PUB      hash: sub, hook, tag, seq, last (id of the latest
//	              message), handed (messages up to this id reached some
//	              subscriber, or were kept and handed to one), waiting
//	              (stretches below handed that none has had yet: what a
//	              full queue or a resume left, for the next subscriber)
//	P:sub:SUB     the publisher token of a subscriber token
//	P:channels    sorted set of publisher tokens, in order of preparation
//	P:seq         the last preparation number
//	P:log:PUB     Stream of the channel's latest messages (the backlog, and
//	              what a node reads to fill a gap), trimmed and expiring
//	P:nodes       sorted set of live nodes, scored by when they expire
//	P:node:ID     hash: this node's subscribers per channel; expires with
//	              the node, so a dead node's counts vanish by themselves
//	P:events      Pub/Sub channel: every publish, edit and delete, for
//	              every node
//	P:follow:ID   Pub/Sub channel that nothing is published to: a node
//	              subscribes to it once it has caught up after connecting,
//	              so a publish knows which nodes follow the announcements
//	P:join:ID:N   the ids a join took from a backlog, for a minute: its
//	              receipt, should the node not get the join's answer
//
// One Lua script per change makes it atomic: a publish checks the channel,
// appends to its stream and announces it with the previous id in one step,
// so every node sees messages in one order and notices a gap (a lost
// announcement: the previous id is not the last one it delivered), which it
// fills from the stream.

// Timings and sizes of the Redis engine, each with its reason.
const (
	// redisFailureLogEvery spaces the log lines of failed commands that
	// nobody waits for (counts of subscribers that come and go): an outage
	// would otherwise log one per subscriber.
	redisFailureLogEvery = 10 * time.Second
	// redisCommandTimeout bounds a command from write to reply: a change
	// answers 503 within 2 s when Redis does not answer.
	redisCommandTimeout = 1500 * time.Millisecond
	// redisReconnectWait is how long a request waits for a connection that
	// is being replaced, on top of redisCommandTimeout: still within 2 s.
	redisReconnectWait = 400 * time.Millisecond
	// redisDialTimeout bounds connecting, TLS and AUTH included.
	redisDialTimeout = 1500 * time.Millisecond
	// After losing Redis, a node tries again after redisBackoffMin, twice as
	// long each time up to redisBackoffMax, each wait ±50% at random so that
	// nodes do not come back in step. It never gives up.
	redisBackoffMin = 100 * time.Millisecond
	redisBackoffMax = 5 * time.Second
	// The Pub/Sub connection is probed with PING every redisProbeInterval;
	// one silent for redisSilenceLimit is dead (a cut network says nothing),
	// so /healthz turns 503 within a few seconds, never "connected" while
	// receiving nothing.
	redisProbeInterval = time.Second
	redisSilenceLimit  = 3 * time.Second
	// A node refreshes its liveness every presenceInterval; its counts
	// vanish nodeTTL after it stops (kill -9), within the 15 s promised.
	presenceInterval = time.Second
	nodeTTL          = 10 * time.Second
	// localIdleRounds: a channel this node follows for its subscribers is
	// forgotten after this many presence rounds without one.
	localIdleRounds = 5
	// streamMinLength and streamMinTTL keep a channel's stream long enough
	// for a node to fill a gap after a short outage, even with -backlog 0.
	streamMinLength = 100
	streamMinTTL    = time.Minute
	// streamAwayLength bounds a stream while a node with subscribers of
	// its channel does not follow the announcements (it reconnects): the
	// node fills a gap of up to this many messages from it once back, and
	// Redis memory does not grow with every publish should it never be.
	streamAwayLength = 10_000
	// catchUpPage is how many messages a node reads from a stream at once
	// to fill a gap.
	catchUpPage = 100
	// joinReadBytes bounds the messages one join reads from the channel's
	// stream (it reads one, however big): Redis runs nothing else while the
	// join script reads, the node holds a copy for each subscriber, and an
	// event stream may resume from id 0 again and again. The older ones
	// wait for the next subscriber.
	joinReadBytes = 1 << 20
	// joinReceiptTTL is how long Redis keeps what a join took, for the
	// node to give it back should the join's answer be lost.
	joinReceiptTTL = time.Minute
	// redisListPage is how many channels one call of the list script reads:
	// each costs a lookup per live node, and Redis runs nothing else
	// meanwhile.
	redisListPage = 100
	// RESP limits: a reply bigger or deeper than these is a broken stream.
	respMaxBulk  = 512 << 20 // Redis's own proto-max-bulk-len
	respMaxArray = 1 << 24
	respMaxDepth = 4
	respMaxLine  = 64 << 10
)

// redisOptions is a parsed -redis URL.
type redisOptions struct {
	addr, host     string
	tls            bool
	rootCAs        *x509.CertPool // -redis-ca; nil: the system's
	user, password string
	db             int
}

// parseRedisURL reads redis://[user:password@]host:port/db or rediss://.
func parseRedisURL(raw string) (*redisOptions, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, errors.New("not a URL such as redis://127.0.0.1:6379/0")
	}
	o := &redisOptions{host: u.Hostname()}
	switch u.Scheme {
	case "redis":
	case "rediss":
		o.tls = true
	default:
		return nil, fmt.Errorf("scheme %q: use redis:// or rediss://", u.Scheme)
	}
	if o.host == "" || !validHost(o.host) {
		return nil, errors.New("no host: use redis://host:port/db")
	}
	port := u.Port()
	if port == "" {
		port = "6379"
	}
	o.addr = net.JoinHostPort(o.host, port)
	if u.User != nil {
		o.password, _ = u.User.Password()
		o.user = u.User.Username()
		if o.password == "" { // redis://:password@ or redis://password@
			o.user, o.password = "", o.user
		}
	}
	if db := strings.Trim(u.Path, "/"); db != "" {
		if o.db, err = strconv.Atoi(db); err != nil || o.db < 0 {
			return nil, fmt.Errorf("database %q is not a number", db)
		}
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, errors.New("no query or fragment is understood")
	}
	return o, nil
}

// ---- RESP2: the part of Redis's protocol the engine uses ----

// respError is an error reply from Redis.
type respError string

func (e respError) Error() string { return "redis: " + string(e) }

// errProtocol is a reply that is not RESP2: the connection is closed.
var errProtocol = errors.New("redis: malformed reply")

// appendCommand encodes a command as an array of bulk strings.
func appendCommand(b []byte, args ...any) []byte {
	b = strconv.AppendInt(append(b, '*'), int64(len(args)), 10)
	b = append(b, "\r\n"...)
	for _, a := range args {
		var s []byte
		switch v := a.(type) {
		case string:
			b = strconv.AppendInt(append(b, '$'), int64(len(v)), 10)
			b = append(append(append(b, "\r\n"...), v...), "\r\n"...)
			continue
		case []byte:
			s = v
		case int:
			s = strconv.AppendInt(nil, int64(v), 10)
		case int64:
			s = strconv.AppendInt(nil, v, 10)
		case uint64:
			s = strconv.AppendUint(nil, v, 10)
		default:
			panic(fmt.Sprintf("redis argument of type %T", a))
		}
		b = strconv.AppendInt(append(b, '$'), int64(len(s)), 10)
		b = append(append(append(b, "\r\n"...), s...), "\r\n"...)
	}
	return b
}

// readReply reads one reply: string (simple), []byte (bulk), int64, nil,
// respError or []any (array).
func readReply(r *bufio.Reader) (any, error) { return readReplyDepth(r, 0) }

func readReplyDepth(r *bufio.Reader, depth int) (any, error) {
	line, err := r.ReadSlice('\n')
	switch {
	case errors.Is(err, bufio.ErrBufferFull):
		return nil, errProtocol
	case err != nil:
		return nil, err
	case len(line) < 3 || line[len(line)-2] != '\r':
		return nil, errProtocol
	}
	kind, body := line[0], line[1:len(line)-2]
	switch kind {
	case '+':
		return string(body), nil
	case '-':
		return respError(body), nil
	case ':':
		n, err := strconv.ParseInt(string(body), 10, 64)
		if err != nil {
			return nil, errProtocol
		}
		return n, nil
	}
	n, err := strconv.ParseInt(string(body), 10, 64)
	if err != nil || n < -1 {
		return nil, errProtocol
	}
	switch kind {
	case '$':
		if n < 0 {
			return nil, nil
		}
		if n > respMaxBulk {
			return nil, errProtocol
		}
		data, err := readBulk(r, int(n))
		if err != nil {
			return nil, err
		}
		return data, nil
	case '*':
		if n < 0 {
			return nil, nil
		}
		if n > respMaxArray || depth >= respMaxDepth {
			return nil, errProtocol
		}
		items := make([]any, 0, min(n, 1024)) // grows with what arrives, not with what is claimed
		for range n {
			item, err := readReplyDepth(r, depth+1)
			if err != nil {
				return nil, err
			}
			items = append(items, item)
		}
		return items, nil
	}
	return nil, errProtocol
}

// respComplete says whether b begins with a whole reply, so that reading
// it needs no I/O; a malformed one counts as not whole.
func respComplete(b []byte) bool {
	_, ok := respSkip(b, 0)
	return ok
}

// respSkip is the length of the whole reply that b begins with.
func respSkip(b []byte, depth int) (int, bool) {
	end := bytes.IndexByte(b, '\n')
	if end < 2 || b[end-1] != '\r' || depth > respMaxDepth {
		return 0, false
	}
	switch b[0] {
	case '+', '-', ':':
		return end + 1, true
	case '$', '*':
	default:
		return 0, false
	}
	n, err := strconv.Atoi(string(b[1 : end-1]))
	switch {
	case err != nil:
		return 0, false
	case n < 0:
		return end + 1, true
	case b[0] == '$':
		if n > len(b)-end-3 { // the bytes and CRLF after the line
			return 0, false
		}
		return end + 1 + n + 2, true
	}
	off := end + 1
	for range n {
		k, ok := respSkip(b[off:], depth+1)
		if !ok {
			return 0, false
		}
		off += k
	}
	return off, true
}

// readBulk reads n bytes and the CRLF after them. A big one grows as the
// bytes arrive, so that a bogus length costs no memory up front.
func readBulk(r *bufio.Reader, n int) ([]byte, error) {
	var data []byte
	if n <= respMaxLine {
		data = make([]byte, n+2)
		if _, err := io.ReadFull(r, data); err != nil {
			return nil, err
		}
	} else {
		var buf bytes.Buffer
		if _, err := io.CopyN(&buf, r, int64(n)+2); err != nil {
			return nil, err
		}
		data = buf.Bytes()
	}
	if data[n] != '\r' || data[n+1] != '\n' {
		return nil, errProtocol
	}
	return data[:n:n], nil
}

// replyString is a bulk or simple string reply as a string; "" for nil.
func replyString(v any) string {
	switch s := v.(type) {
	case []byte:
		return string(s)
	case string:
		return s
	}
	return ""
}

// replyOptional is a bulk reply that may be nil, as *string.
func replyOptional(v any) *string {
	if b, ok := v.([]byte); ok {
		s := string(b)
		return &s
	}
	return nil
}

// ---- A Redis connection that pipelines, and comes back by itself ----

// redisClient is one connection for commands, shared by every request:
// commands are written in the order they are issued and their replies read
// in the same order by one reader, so callers that issue while holding a
// lock (sendLocked, which holds no lock while the write waits) get Redis
// to apply their commands in that lock's order. Any I/O error, malformed
// reply or timeout closes the connection and fails every command waiting
// on it (a late reply could otherwise answer the wrong command); keep
// reconnects forever.
type redisClient struct {
	opts *redisOptions
	log  *slog.Logger

	mu   sync.Mutex
	conn *redisConn    // nil while down
	down error         // why it is down; nil once connected
	ever bool          // connected at least once
	up   chan struct{} // closed and replaced at each connection

	failures logLimit // spaces the log lines of failed commands nobody waits for
	refused  func()   // called when Redis refuses a command nobody waits for; set before use
}

type redisConn struct {
	net.Conn
	br       *bufio.Reader
	out      []byte       // commands not written yet, in order; under the client's mu
	spare    []byte       // the last buffer written, for reuse; under mu
	flushing bool         // a sender is writing out; under mu
	pending  []*redisCall // sent, waiting for their reply, in order; under mu
	idle     bool         // the reader waits with no deadline, as nothing is pending; under mu
	closed   bool
}

// redisCall is one command on its way; done receives its outcome once.
type redisCall struct {
	deadline time.Time
	done     chan redisResult // nil: nobody waits (its error is logged)
	what     any              // the command's name, for that log
}

type redisResult struct {
	reply any
	err   error
}

// finish hands the outcome to the waiter; a command nobody waits for logs
// its failure, at most one line per redisFailureLogEvery: during an outage
// every subscriber that comes or goes makes one.
func (c *redisCall) finish(client *redisClient, reply any, err error) {
	if c.done != nil {
		c.done <- redisResult{reply, err}
	} else if err == nil {
		if e, ok := reply.(respError); ok {
			err = e
			if client.refused != nil {
				client.refused()
			}
		}
	}
	if c.done != nil || err == nil {
		return
	}
	if ok, suppressed := client.failures.allow(time.Now(), redisFailureLogEvery); ok {
		client.log.Warn("redis command failed", "command", c.what, "err", err, "also_failed", suppressed)
	}
}

// wait returns the reply, or the error that kept it away; an error reply
// from Redis is an error too.
func (c *redisCall) wait() (any, error) {
	r := <-c.done
	if e, ok := r.reply.(respError); ok && r.err == nil {
		return nil, e
	}
	return r.reply, r.err
}

// unavailable says why Redis cannot be reached, for a 503 and /healthz.
// unsent: the command was never written, so sending it again is safe.
type unavailable struct {
	err    error
	unsent bool
}

func (e unavailable) Error() string { return "cannot reach Redis: " + e.err.Error() }
func (e unavailable) Unwrap() error { return e.err }

// send issues a command without waiting for its reply, and writes it,
// with what others issue meanwhile, unless a write is under way: then that
// writer takes it too. quiet: nobody will wait; a failure is only logged.
// A caller holding a lock uses sendLocked.
func (c *redisClient) send(quiet bool, args ...any) *redisCall {
	call, rc := c.queue(quiet, args)
	if rc != nil {
		// This sender first lets the goroutines that are ready to run add
		// theirs (publishers whose requests arrived together): with 8
		// publishers this makes about 0.3 writes to Redis a publish
		// instead of 1, and the daemon spends 3 to 7 µs less on each.
		runtime.Gosched()
		c.flush(rc)
	}
	return call
}

// sendLocked is send for a caller that holds a lock (a channel's, the
// hub's): the command takes its place in that lock's order, and a
// goroutine of its own writes it, so that no lock is held while a write
// waits for a Redis that does not read.
func (c *redisClient) sendLocked(quiet bool, args ...any) *redisCall {
	call, rc := c.queue(quiet, args)
	if rc != nil {
		go c.flush(rc)
	}
	return call
}

// queue adds a command to what the connection writes next, and returns
// the connection when no write is under way: the caller then writes
// (flush). A command that cannot be queued fails at once.
func (c *redisClient) queue(quiet bool, args []any) (*redisCall, *redisConn) {
	call := &redisCall{what: args[0]}
	if !quiet {
		call.done = make(chan redisResult, 1)
	}
	c.mu.Lock()
	rc := c.conn
	if rc == nil {
		err := c.down
		c.mu.Unlock()
		if err == nil {
			err = errors.New("not connected yet")
		}
		call.finish(c, nil, unavailable{err, true})
		return call, nil
	}
	call.deadline = time.Now().Add(redisCommandTimeout)
	rc.out = appendCommand(rc.out, args...)
	rc.pending = append(rc.pending, call)
	if rc.idle { // the reader waits for a reply with no deadline: this command's bounds it
		rc.idle = false
		_ = rc.SetReadDeadline(call.deadline) // fails only once closed, which the reader sees
	}
	if rc.flushing { // the writer at work writes this command too
		c.mu.Unlock()
		return call, nil
	}
	rc.flushing = true
	c.mu.Unlock()
	return call, rc
}

// flush writes what is queued, and what queues meanwhile, in one write
// each time: concurrent commands share a write. The caller was told to by
// queue; nothing else writes to rc until it returns.
func (c *redisClient) flush(rc *redisConn) {
	c.mu.Lock()
	for len(rc.out) > 0 {
		out := rc.out
		rc.out, rc.spare = rc.spare[:0], nil // never two users of one array
		c.mu.Unlock()
		err := rc.SetWriteDeadline(time.Now().Add(redisCommandTimeout))
		if err == nil {
			_, err = rc.Write(out)
		}
		c.mu.Lock()
		if cap(out) <= 64<<10 { // a big publish: do not keep its buffer
			rc.spare = out[:0]
		}
		if err != nil {
			rc.flushing = false
			c.mu.Unlock()
			c.lost(rc, err) // fails every command written or not
			return
		}
	}
	rc.flushing = false
	c.mu.Unlock()
}

// do issues a command and waits for its reply.
func (c *redisClient) do(args ...any) (any, error) { return c.send(false, args...).wait() }

// probe sends a PING unless the connection is down already: a connection
// that went silent (no reply within redisCommandTimeout) goes the way of
// any lost connection (lost, then keep connects again). One that Redis
// closed, the reader sees by itself, but a silent one only a command
// finds: a node that sends nothing would otherwise learn it from its next
// request, which would fail.
func (c *redisClient) probe() {
	c.mu.Lock()
	up := c.conn != nil
	c.mu.Unlock()
	if up {
		c.send(true, "PING")
	}
}

// read is the reader of rc: it hands each reply to the oldest command
// waiting, until the connection fails. A command is taken out of pending
// under mu before its reply is handed over, so that lost, which fails what
// is left in pending, never answers a command twice. While no command
// waits, it waits for the connection to end (Redis closes a client idle
// for its timeout, a restart or CLIENT KILL closes it), so that the node
// connects again before a request can fail on it; the next command sets
// the deadline of that wait (queue).
func (c *redisClient) read(rc *redisConn) {
	var call *redisCall // the oldest command waiting
	for {
		if call == nil {
			var err error
			c.mu.Lock()
			closed := rc.closed
			if len(rc.pending) > 0 {
				call = rc.pending[0]
			} else if !closed {
				rc.idle = true
				err = rc.SetReadDeadline(time.Time{})
			}
			c.mu.Unlock()
			if closed {
				return
			}
			if call == nil {
				if err == nil {
					_, err = rc.br.Peek(1)
				}
				c.mu.Lock()
				rc.idle = false
				if err == nil && len(rc.pending) == 0 {
					err = errProtocol // a reply to no command
				}
				c.mu.Unlock()
				if err != nil {
					if isTimeout(err) {
						err = fmt.Errorf("no answer within %v: %w", redisCommandTimeout, err)
					}
					c.lost(rc, err)
					return
				}
				continue
			}
		}
		var err error
		if buffered, _ := rc.br.Peek(rc.br.Buffered()); !respComplete(buffered) {
			err = rc.SetReadDeadline(call.deadline) // only a read that may wait needs one
		}
		var reply any
		if err == nil {
			reply, err = readReply(rc.br)
		}
		if err != nil {
			if isTimeout(err) {
				err = fmt.Errorf("no answer within %v: %w", redisCommandTimeout, err)
			}
			c.lost(rc, err)
			return
		}
		c.mu.Lock()
		if rc.closed { // lost has failed it already
			c.mu.Unlock()
			return
		}
		rc.pending[0] = nil
		rc.pending = rc.pending[1:]
		answered := call
		call = nil
		if len(rc.pending) > 0 {
			call = rc.pending[0]
		}
		c.mu.Unlock()
		answered.finish(c, reply, nil)
	}
}

// lost closes rc and fails what waits on it.
func (c *redisClient) lost(rc *redisConn, err error) {
	c.mu.Lock()
	if c.conn == rc {
		c.conn, c.down = nil, err
	}
	waiting := rc.pending
	rc.pending, rc.out, rc.closed = nil, nil, true
	c.mu.Unlock()
	rc.Close() // ends the reader's wait
	for _, call := range waiting {
		call.finish(c, nil, unavailable{err: err})
	}
}

// awaitUp waits until a connection is up, for at most wait: a request that
// comes while a lost connection is being replaced waits for the new one
// rather than failing at once.
func (c *redisClient) awaitUp(wait time.Duration) bool {
	c.mu.Lock()
	up, connected := c.up, c.conn != nil
	c.mu.Unlock()
	if connected {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-up:
		return true
	case <-t.C:
		return false
	}
}

// health is nil while connected.
func (c *redisClient) health() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		return nil
	}
	if c.down == nil {
		return unavailable{err: errors.New("not connected yet")}
	}
	return unavailable{err: c.down}
}

// keep connects, serves the connection until it fails, and connects again,
// forever, with capped backoff and jitter, until ctx ends. connected runs on
// every new connection, on a goroutine of its own, so that it may issue
// commands.
func (c *redisClient) keep(ctx context.Context, first net.Conn, connected func()) {
	backoff := redisBackoffMin
	for {
		conn, err := first, error(nil)
		first = nil
		if conn == nil {
			conn, err = c.opts.dial(ctx)
		}
		if err == nil {
			rc := &redisConn{Conn: conn, br: bufio.NewReaderSize(conn, respMaxLine)}
			c.mu.Lock()
			c.conn, c.down = rc, nil
			close(c.up)
			c.up = make(chan struct{})
			if c.ever {
				c.log.Info("redis connected again", "addr", c.opts.addr)
			}
			c.ever = true
			c.mu.Unlock()
			stopWatch := context.AfterFunc(ctx, func() { c.lost(rc, errors.New("shutting down")) })
			done := make(chan struct{})
			go func() { defer close(done); connected() }()
			c.read(rc)
			stopWatch()
			<-done
			backoff = redisBackoffMin
			c.mu.Lock()
			err = c.down
			c.mu.Unlock()
		} else {
			c.mu.Lock()
			c.down = err
			c.mu.Unlock()
		}
		if ctx.Err() != nil {
			return
		}
		c.log.Warn("redis connection lost; connecting again", "addr", c.opts.addr, "err", err, "in", backoff)
		if !sleep(ctx, jitter(backoff)) {
			return
		}
		backoff = min(2*backoff, redisBackoffMax)
	}
}

// jitter is d ±50%, at random.
func jitter(d time.Duration) time.Duration {
	var b [8]byte
	_, _ = rand.Read(b[:])
	f := float64(uint64(b[0])|uint64(b[1])<<8|uint64(b[2])<<16) / float64(1<<24)
	return time.Duration(float64(d) * (0.5 + f))
}

// sleep waits d; false when ctx ended first.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// authError is a refused AUTH: a wrong password, not an outage.
type authError struct{ err error }

func (e authError) Error() string {
	return "redis refused the password (check the user and password in -redis): " + e.err.Error()
}

// dial connects, with TLS for rediss://, and sends AUTH and SELECT: every
// connection, the first and each one after a loss, starts the same.
func (o *redisOptions) dial(ctx context.Context) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, redisDialTimeout)
	defer cancel()
	d := net.Dialer{KeepAlive: 15 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", o.addr)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", o.addr, err)
	}
	deadline, _ := ctx.Deadline()
	if err := conn.SetDeadline(deadline); err != nil {
		conn.Close()
		return nil, err
	}
	if o.tls {
		tc := tls.Client(conn, &tls.Config{ServerName: o.host, RootCAs: o.rootCAs, MinVersion: tls.VersionTLS12})
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, fmt.Errorf("TLS with %s: %w", o.addr, err)
		}
		conn = tc
	}
	br := bufio.NewReader(conn)
	hello := func(args ...any) error {
		if _, err := conn.Write(appendCommand(nil, args...)); err != nil {
			return err
		}
		reply, err := readReply(br)
		if err != nil {
			return err
		}
		if e, ok := reply.(respError); ok {
			return e
		}
		return nil
	}
	if o.password != "" {
		args := []any{"AUTH", o.password}
		if o.user != "" {
			args = []any{"AUTH", o.user, o.password}
		}
		if err := hello(args...); err != nil {
			conn.Close()
			var re respError
			if errors.As(err, &re) {
				return nil, authError{err}
			}
			return nil, fmt.Errorf("AUTH: %w", err)
		}
	}
	// Without a password, a Redis that wants one answers the first
	// command with NOAUTH: as wrong as a wrong password.
	failed := func(what string, err error) error {
		conn.Close()
		var re respError
		if errors.As(err, &re) && strings.HasPrefix(string(re), "NOAUTH") {
			return authError{err}
		}
		return fmt.Errorf("%s: %w", what, err)
	}
	if o.db != 0 {
		if err := hello("SELECT", o.db); err != nil {
			return nil, failed(fmt.Sprint("SELECT ", o.db), err)
		}
	}
	// A frozen Redis still accepts connections (the kernel does): only an
	// answer shows that it runs. Commands are never queued on a connection
	// that did not answer, to be applied when Redis wakes up.
	if err := hello("PING"); err != nil {
		return nil, failed("PING", err)
	}
	if br.Buffered() > 0 {
		conn.Close()
		return nil, errProtocol
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// ---- The Redis engine ----

// redisScript is a Lua script run with EVALSHA, and EVAL when Redis does not
// know it (NOSCRIPT: after a restart).
type redisScript struct{ src, sha string }

func newScript(body string) *redisScript {
	src := luaPrelude + body
	sum := sha1.Sum([]byte(src))
	return &redisScript{src, hex.EncodeToString(sum[:])}
}

// luaPrelude is shared by the scripts. ARGV[1] is always the key prefix.
// Keys are named in the scripts, not passed in KEYS: this engine runs on one
// Redis (or a primary with replicas), not on Redis Cluster.
const luaPrelude = `
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function listeners(pub, now)
  local n = 0
  for _, node in ipairs(redis.call('ZRANGEBYSCORE', P .. 'nodes', now, '+inf')) do
    n = n + (tonumber(redis.call('HGET', P .. 'node:' .. node, pub)) or 0)
  end
  return n
end
local function view(pub, now)
  local f = redis.call('HMGET', P .. 'ch:' .. pub, 'sub', 'hook', 'tag')
  if not f[1] then return false end
  return {pub, f[1], f[2], f[3], listeners(pub, now)}
end
local function before(a, b) -- stream ids
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or am == bm and as < bs
end
`

var (
	// ARGV: P, pub, sub, has hook, hook, has tag, tag. 0: a token is taken.
	prepareScript = newScript(`
local ch, sub = P .. 'ch:' .. ARGV[2], P .. 'sub:' .. ARGV[3]
if redis.call('EXISTS', ch, sub) > 0 then return 0 end
local seq = redis.call('INCR', P .. 'seq')
redis.call('HSET', ch, 'sub', ARGV[3], 'seq', seq)
if ARGV[4] == '1' then redis.call('HSET', ch, 'hook', ARGV[5]) end
if ARGV[6] == '1' then redis.call('HSET', ch, 'tag', ARGV[7]) end
redis.call('SET', sub, ARGV[2])
redis.call('ZADD', P .. 'channels', seq, ARGV[2])
return 1`)

	// ARGV: P, pub.
	showScript = newScript(`return view(ARGV[2], now_ms())`)

	// ARGV: P, after, count. The next count channels prepared after number
	// after, oldest first: {number of the last one, views, how many it
	// read}. Fewer than count read: the list ends there.
	listScript = newScript(`
local now, out = now_ms(), {}
local page = redis.call('ZRANGEBYSCORE', P .. 'channels', '(' .. ARGV[2], '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[3])
for i = 1, #page, 2 do
  local v = view(page[i], now)
  if v then out[#out + 1] = v end
end
return {page[#page] or ARGV[2], out, #page / 2}`)

	// ARGV: P, pub, set hook, hook ('' clears it), set tag, tag. Nodes
	// learn the new hook URL from the announcement.
	editScript = newScript(`
local ch = P .. 'ch:' .. ARGV[2]
if redis.call('EXISTS', ch) == 0 then return false end
if ARGV[3] == '1' then
  if ARGV[4] == '' then redis.call('HDEL', ch, 'hook') else redis.call('HSET', ch, 'hook', ARGV[4]) end
  redis.call('PUBLISH', P .. 'events', 'e ' .. ARGV[2] .. ' ' .. ARGV[4])
end
if ARGV[5] == '1' then
  if ARGV[6] == '' then redis.call('HDEL', ch, 'tag') else redis.call('HSET', ch, 'tag', ARGV[6]) end
end
return view(ARGV[2], now_ms())`)

	// ARGV: P, pub, data, binary (0/1), stream length, stream TTL (ms),
	// stream length while a node is away. The message id is the stream id:
	// above the last one, also after the stream expired or the clock went
	// back; the sequence stays below 2^20 so that ms<<20|seq is the SSE id.
	// The stream is trimmed to its length only while every live node with
	// subscribers of the channel follows the announcements (P:follow:ID has
	// a subscriber); else to streamAwayLength, so that a node whose Pub/Sub
	// connection is down fills its whole gap from the stream once back.
	// Returns the subscribers on live nodes: with none, the message waits
	// (handed stays where it was).
	publishScript = newScript(`
local ch = P .. 'ch:' .. ARGV[2]
if redis.call('EXISTS', ch) == 0 then return false end
local prev = redis.call('HGET', ch, 'last') or '0-0'
local ms, seq = string.match(prev, '^(%d+)-(%d+)$')
ms, seq = tonumber(ms), tonumber(seq)
local now = now_ms()
if now > ms then ms, seq = now, 0 elseif seq + 1 < 1048576 then seq = seq + 1 else ms, seq = ms + 1, 0 end
local id = string.format('%d-%d', ms, seq)
local log = P .. 'log:' .. ARGV[2]
local n, trim = 0, true
for _, node in ipairs(redis.call('ZRANGEBYSCORE', P .. 'nodes', now, '+inf')) do
  local here = tonumber(redis.call('HGET', P .. 'node:' .. node, ARGV[2])) or 0
  n = n + here
  if here > 0 and trim then trim = redis.call('PUBSUB', 'NUMSUB', P .. 'follow:' .. node)[2] > 0 end
end
if trim then
  redis.call('XADD', log, 'MAXLEN', '~', ARGV[5], id, 'd', ARGV[3], 'b', ARGV[4])
else
  redis.call('XADD', log, 'MAXLEN', '~', ARGV[7], id, 'd', ARGV[3], 'b', ARGV[4])
end
redis.call('PEXPIRE', log, ARGV[6])
if n > 0 then redis.call('HSET', ch, 'last', id, 'handed', id) else redis.call('HSET', ch, 'last', id) end
redis.call('PUBLISH', P .. 'events', 'p ' .. ARGV[2] .. ' ' .. id .. ' ' .. prev .. ' ' .. ARGV[4] .. ' ' .. ARGV[3])
return n`)

	// ARGV: P, pub. Returns the subscriber token, or nil.
	deleteScript = newScript(`
local ch = P .. 'ch:' .. ARGV[2]
local sub = redis.call('HGET', ch, 'sub')
if not sub then return false end
redis.call('DEL', ch, P .. 'sub:' .. sub, P .. 'log:' .. ARGV[2])
redis.call('ZREM', P .. 'channels', ARGV[2])
for _, node in ipairs(redis.call('ZRANGE', P .. 'nodes', 0, -1)) do
  redis.call('HDEL', P .. 'node:' .. node, ARGV[2])
end
redis.call('PUBLISH', P .. 'events', 'd ' .. ARGV[2])
return sub`)

	// ARGV: P, sub. Returns {pub, hook, tag}, or nil.
	findScript = newScript(`
local pub = redis.call('GET', P .. 'sub:' .. ARGV[2])
if not pub then return false end
local f = redis.call('HMGET', P .. 'ch:' .. pub, 'hook', 'tag', 'sub')
if not f[3] then return false end
return {pub, f[1], f[2]}`)

	// ARGV: P, pub, node, this node's subscribers of the channel (the
	// joining one included), node TTL (ms), 'new' or 'resume', the id to
	// resume after, backlog, backlog TTL (ms), room in the subscriber's
	// queue, the most bytes of messages to read (joinReadBytes), the name
	// and lifetime (ms) of its receipt. It counts
	// the subscriber before any later publish and hands it messages, newest
	// first: new, those waiting (after handed, and the stretches of
	// waiting); resume, those after its id, waiting or not. As on one node,
	// what does not fit in its queue (the newest) and what a join did not
	// reach (beyond the backlog or the bytes) wait for the next subscriber:
	// handed moves to last, and waiting keeps what no subscriber has had
	// below it. A join that adds its node to P:nodes removes the nodes
	// whose presence expired a TTL ago (killed with -9 while no node
	// refreshed): only such joins add to P:nodes, so it holds no node dead
	// for longer than the last one added. The ids of what it took, oldest
	// first, are its receipt (P:join:NAME): should its answer be lost,
	// the node gives them back (settleJoins). Returns {last id, entries},
	// or nil.
	joinScript = newScript(`
local ch = P .. 'ch:' .. ARGV[2]
if redis.call('EXISTS', ch) == 0 then return false end
local now, ttl = now_ms(), tonumber(ARGV[5])
local node = P .. 'node:' .. ARGV[3]
redis.call('HSET', node, ARGV[2], ARGV[4])
redis.call('PEXPIRE', node, ttl)
if redis.call('ZADD', P .. 'nodes', now + ttl, ARGV[3]) == 1 then -- a node new to P:nodes
  redis.call('ZREMRANGEBYSCORE', P .. 'nodes', '-inf', now - ttl)
end
local f = redis.call('HMGET', ch, 'last', 'handed', 'waiting')
local last, handed, count = f[1] or '0-0', f[2] or '0-0', tonumber(ARGV[8])
local waiting = {} -- a1 b1 a2 b2 ...: the messages in (a, b], oldest stretch first
if count > 0 then
  for id in string.gmatch(f[3] or '', '%S+') do waiting[#waiting + 1] = id end
  if handed ~= last and before(handed, last) then waiting[#waiting + 1], waiting[#waiting + 2] = handed, last end
end
local kept, oldest, budget, beyond = {}, now - tonumber(ARGV[9]), tonumber(ARGV[11]), nil
local read, size = 0, 0 -- entries read, and their bytes
local function take(to, after) -- newest first, until count, the budget or an expired one
  while #kept < count do
    local want = 1 -- then as many as the budget holds, at the size seen so far
    if read > 0 then want = math.max(1, math.min(count - #kept, 16, math.floor(budget * read / math.max(size, 1)))) end
    local page = redis.call('XREVRANGE', P .. 'log:' .. ARGV[2], to, '(' .. after, 'COUNT', want)
    for _, e in ipairs(page) do -- e: {id, {'d', data, 'b', binary}}
      if tonumber(string.match(e[1], '^%d+')) < oldest then return false end
      read, size, budget = read + 1, size + #e[2][2], budget - #e[2][2]
      if budget < 0 and #kept > 0 then
        beyond = e[1] -- this one and those before it were not reached
        return false
      end
      kept[#kept + 1] = e
    end
    if #page < want then return true end
    to = '(' .. page[#page][1]
  end
  return false
end
local from = ARGV[7]
if ARGV[6] == 'new' then
  from = '0-0'
  for i = #waiting - 1, 1, -2 do
    if not take(waiting[i + 1], waiting[i]) then break end
  end
elseif count > 0 and before(from, last) then
  take('+', from)
end
if beyond then from = beyond end -- what the budget did not reach still waits
local room, to = tonumber(ARGV[10]), last
if #kept > room then
  local fits = {}
  for i = #kept - room + 1, #kept do fits[#fits + 1] = kept[i] end
  kept, to = fits, fits[1][1]
end
local left = {} -- waiting, less (from, to], which was handed out, and what expired
local function leave(a, b)
  if before(a, b) and tonumber(string.match(b, '^%d+')) >= oldest then left[#left + 1], left[#left + 2] = a, b end
end
for i = 1, #waiting - 1, 2 do
  local a, b = waiting[i], waiting[i + 1]
  if not before(from, to) then
    leave(a, b)
  else
    if before(a, from) then leave(a, before(b, from) and b or from) end
    if before(to, b) then leave(before(a, to) and to or a, b) end
  end
end
local skip = math.max(0, #left / 2 - count) * 2 -- a join takes count at most, the newest
if handed ~= last then redis.call('HSET', ch, 'handed', last) end
local rest = table.concat(left, ' ', skip + 1)
if rest ~= (f[3] or '') then -- most joins find nothing waiting, and write nothing here
  if rest == '' then redis.call('HDEL', ch, 'waiting') else redis.call('HSET', ch, 'waiting', rest) end
end
if #kept > 0 then -- the receipt, should the answer not reach the node
  local ids = {}
  for i = #kept, 1, -1 do ids[#ids + 1] = kept[i][1] end
  redis.call('SET', P .. 'join:' .. ARGV[12], table.concat(ids, ' '), 'PX', ARGV[13])
end
return {last, kept}`)

	// ARGV: P, pub, then the ids a join took, oldest first, which its
	// subscriber never had (its upgrade failed): they wait again for the
	// next subscriber, each as the stretch after the entry before it in
	// the stream, among the stretches of waiting in their order.
	unjoinScript = newScript(`
local ch, log = P .. 'ch:' .. ARGV[2], P .. 'log:' .. ARGV[2]
if redis.call('EXISTS', ch) == 0 then return 0 end
local stretches = {}
local ids = {}
for id in string.gmatch(redis.call('HGET', ch, 'waiting') or '', '%S+') do ids[#ids + 1] = id end
for i = 1, #ids - 1, 2 do stretches[#stretches + 1] = {ids[i], ids[i + 1]} end
for i = 3, #ARGV do
  local prev = redis.call('XREVRANGE', log, '(' .. ARGV[i], '-', 'COUNT', 1)[1]
  stretches[#stretches + 1] = {prev and prev[1] or '0-0', ARGV[i]}
end
table.sort(stretches, function(x, y) return before(x[2], y[2]) end)
local out = {}
for _, s in ipairs(stretches) do
  if #out > 0 and out[#out] == s[1] then out[#out] = s[2] else out[#out + 1], out[#out + 2] = s[1], s[2] end
end
redis.call('HSET', ch, 'waiting', table.concat(out, ' '))
return 1`)

	// ARGV: P, node, node TTL (ms). Returns 0 when the node's counts are
	// gone (Redis lost them, or this node was away longer than its TTL).
	refreshScript = newScript(`
local now, ttl = now_ms(), tonumber(ARGV[3])
redis.call('ZADD', P .. 'nodes', now + ttl, ARGV[2])
redis.call('ZREMRANGEBYSCORE', P .. 'nodes', '-inf', now - ttl)
return redis.call('PEXPIRE', P .. 'node:' .. ARGV[2], ttl)`)

	// ARGV: P, node, node TTL (ms), then pairs of pub and count. A node
	// with nothing to count leaves P:nodes until a join brings it back.
	rewriteScript = newScript(`
local node, ttl = P .. 'node:' .. ARGV[2], tonumber(ARGV[3])
redis.call('DEL', node)
if #ARGV < 4 then
  redis.call('ZREM', P .. 'nodes', ARGV[2])
  return 1
end
for i = 4, #ARGV - 1, 2 do redis.call('HSET', node, ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', node, ttl)
redis.call('ZADD', P .. 'nodes', now_ms() + ttl, ARGV[2])
return 1`)

	// redisScripts is every script, loaded again at each connect.
	redisScripts = []*redisScript{prepareScript, showScript, listScript, editScript, publishScript,
		deleteScript, findScript, joinScript, unjoinScript, refreshScript, rewriteScript}
)

// redisEngine keeps the channels in Redis. This node holds a *channel only
// for the channels it has subscribers of (its subscribers, its cursor in
// the channel's stream, a copy of the hook URL that every edit refreshes);
// everything else is read from Redis on every request.
type redisEngine struct {
	h          *hub
	cmd        *redisClient
	prefix     string
	node       string // this process, in P:nodes
	backlog    int
	backlogTTL time.Duration
	ctx        context.Context // ends at shutdown: every connection closes
	cancel     context.CancelFunc
	first      net.Conn // the connection made at start, for the keeper
	// hookReads counts the reads of hook URLs in their order (edit
	// announcements, resync), each before it is applied: find, which
	// reads one outside that order, keeps it only when none came meanwhile.
	hookReads atomic.Uint64
	joins     atomic.Uint64 // names the receipts of joins

	mu         sync.Mutex
	recount    atomic.Bool     // Redis refused a count: write them all again
	unsettled  []unsettledJoin // joins whose answers were lost; under mu
	eventsErr  error           // why the Pub/Sub connection is down; nil while up
	subscribed chan struct{}   // closed once Pub/Sub first works
	connected  chan struct{}   // closed once commands first work
	once       [2]sync.Once
}

// sharedChannel is this node's part of a channel that lives in Redis.
type sharedChannel struct {
	r *redisEngine
	// mu orders what this node hands its subscribers: held while a message
	// is fanned out and while a subscriber joins. Taken before ch.mu.
	mu        sync.Mutex
	following bool   // cursor is set: a subscriber joined
	cursor    uint64 // the last message id handed to this node's subscribers
	seen      uint64 // the highest id announced before following began
	// Under ch.mu:
	joining int // subscribers between find and join's end
	sent    int // the count last written to Redis for this node
	idle    int // presence rounds without a subscriber
}

// newRedisEngine connects once to check the URL and the password: a wrong
// password stops the daemon; Redis not answering yet does not (the node
// serves 503 until it does).
func newRedisEngine(h *hub) (*redisEngine, error) {
	r := &redisEngine{
		h:          h,
		cmd:        &redisClient{opts: h.cfg.redis, log: h.log, up: make(chan struct{})},
		prefix:     h.cfg.redisPrefix,
		node:       strings.ToLower(rand.Text()[:12]),
		backlog:    h.cfg.backlog,
		backlogTTL: h.cfg.backlogTTL,
		subscribed: make(chan struct{}),
		connected:  make(chan struct{}),
	}
	r.cmd.refused = func() { r.recount.Store(true) } // out of memory, say: counts may be stale
	r.ctx, r.cancel = context.WithCancel(context.Background())
	conn, err := h.cfg.redis.dial(r.ctx)
	var ae authError
	switch {
	case errors.As(err, &ae):
		r.cancel()
		return nil, err
	case err != nil:
		h.log.Error("redis cannot be reached yet; answering 503 until it can", "addr", h.cfg.redis.addr, "err", err)
		r.cmd.down = err
	}
	r.first = conn
	r.eventsErr = errors.New("not subscribed yet")
	return r, nil
}

// start runs the connections and the presence rounds until the hub stops,
// and waits a moment for Redis, so that the first requests find it.
func (r *redisEngine) start() {
	h := r.h
	h.background.Go(func() {
		r.cmd.keep(r.ctx, r.first, func() {
			r.loadScripts()
			r.countsLost()
			r.once[0].Do(func() { close(r.connected) })
		})
	})
	h.background.Go(r.listen)
	h.background.Go(r.presence)
	h.background.Go(func() {
		<-h.quit
		// Leave at once rather than nodeTTL later; best effort.
		r.cmd.send(true, "ZREM", r.prefix+"nodes", r.node)
		if _, err := r.cmd.do("DEL", r.nodeKey()); err != nil {
			h.log.Warn("leaving redis", "err", err)
		}
		r.cancel()
	})
	t := time.NewTimer(2 * redisDialTimeout)
	defer t.Stop()
	for _, ready := range []chan struct{}{r.connected, r.subscribed} {
		select {
		case <-ready:
		case <-t.C:
			return
		}
	}
}

func (r *redisEngine) nodeKey() string { return r.prefix + "node:" + r.node }

// eval runs a script and waits for its result. When the connection is
// being replaced, it waits redisReconnectWait for the new one: the command
// was not sent, so sending it then is safe. A command sent and not answered
// is never sent again (Redis may have run it).
func (r *redisEngine) eval(s *redisScript, args ...any) (any, error) {
	reply, err := r.retry(r.issue(s, args...), s, args)
	var u unavailable
	if errors.As(err, &u) && u.unsent && r.cmd.awaitUp(redisReconnectWait) {
		reply, err = r.retry(r.issue(s, args...), s, args)
	}
	return reply, err
}

// issue sends a script without waiting for its result.
func (r *redisEngine) issue(s *redisScript, args ...any) *redisCall {
	return r.cmd.send(false, append([]any{"EVALSHA", s.sha, 0}, args...)...)
}

// issueLocked is issue for a caller holding a lock: Redis runs the script
// in that lock's order, and the write happens once the lock is free
// (sendLocked).
func (r *redisEngine) issueLocked(s *redisScript, args ...any) *redisCall {
	return r.cmd.sendLocked(false, append([]any{"EVALSHA", s.sha, 0}, args...)...)
}

// retry waits for call, and sends the script itself if Redis did not know
// it: then it did not run, and nothing was changed.
func (r *redisEngine) retry(call *redisCall, s *redisScript, args []any) (any, error) {
	reply, err := call.wait()
	var re respError
	if errors.As(err, &re) && strings.HasPrefix(string(re), "NOSCRIPT") {
		return r.cmd.do(append([]any{"EVAL", s.src, 0}, args...)...)
	}
	return reply, err
}

func bit(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

func deref(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

func (r *redisEngine) prepare(_ context.Context, opts channelOptions) (channelJSON, error) {
	for {
		pub, sub := newToken(), newToken()
		reply, err := r.eval(prepareScript, r.prefix, pub, sub,
			bit(opts.hookURL != nil), deref(opts.hookURL), bit(opts.tag != nil), deref(opts.tag))
		if err != nil {
			return channelJSON{}, err
		}
		if reply == int64(1) {
			return channelJSON{PublisherToken: pub, SubscriberToken: sub, HookURL: opts.hookURL, Tag: opts.tag}, nil
		}
	}
}

// viewOf reads {pub, sub, hook, tag, listeners} as the scripts answer it.
func viewOf(reply any) (channelJSON, error) {
	f, ok := reply.([]any)
	if reply == nil {
		return channelJSON{}, errNotFound
	}
	if !ok || len(f) != 5 {
		return channelJSON{}, fmt.Errorf("redis: unexpected channel %v", reply)
	}
	n, _ := f[4].(int64)
	return channelJSON{
		PublisherToken:  replyString(f[0]),
		SubscriberToken: replyString(f[1]),
		HookURL:         replyOptional(f[2]),
		Tag:             replyOptional(f[3]),
		Listeners:       int(n),
	}, nil
}

func (r *redisEngine) show(_ context.Context, token string) (channelJSON, error) {
	reply, err := r.eval(showScript, r.prefix, token)
	if err != nil {
		return channelJSON{}, err
	}
	return viewOf(reply)
}

// list reads the channels a page at a time, so that no call holds Redis
// for every channel; like one node's, the list is not a snapshot: a
// channel prepared or deleted meanwhile may or may not be in it.
func (r *redisEngine) list(_ context.Context, match *regexp.Regexp) ([]channelJSON, error) {
	list := []channelJSON{}
	for after := "0"; ; {
		reply, err := r.eval(listScript, r.prefix, after, redisListPage)
		if err != nil {
			return nil, err
		}
		f, ok := reply.([]any)
		if !ok || len(f) != 3 {
			return nil, fmt.Errorf("redis: unexpected page of channels %v", reply)
		}
		items, _ := f[1].([]any)
		for _, item := range items {
			view, err := viewOf(item)
			if err != nil {
				return nil, err
			}
			if match == nil || view.Tag != nil && match.MatchString(*view.Tag) {
				list = append(list, view)
			}
		}
		if read, _ := f[2].(int64); read < redisListPage {
			return list, nil
		}
		after = replyString(f[0])
	}
}

func (r *redisEngine) edit(_ context.Context, token string, opts channelOptions) (channelJSON, error) {
	reply, err := r.eval(editScript, r.prefix, token, bit(opts.setHook), deref(opts.hookURL), bit(opts.setTag), deref(opts.tag))
	if err != nil {
		return channelJSON{}, err
	}
	return viewOf(reply)
}

func (r *redisEngine) publish(_ context.Context, token string, m *message) (int, bool, error) {
	length := max(r.backlog, streamMinLength)
	ttl := max(r.backlogTTL, streamMinTTL)
	reply, err := r.eval(publishScript, r.prefix, token, m.data, bit(m.binary), length, ttl.Milliseconds(), streamAwayLength)
	if err != nil {
		return 0, false, err
	}
	if reply == nil {
		return 0, false, errNotFound
	}
	n, _ := reply.(int64)
	queued := n == 0 && r.backlog > 0
	if queued {
		r.h.stats.queued.Add(1)
	}
	return int(n), queued, nil
}

func (r *redisEngine) remove(_ context.Context, token string) (string, error) {
	reply, err := r.eval(deleteScript, r.prefix, token)
	if err != nil {
		return "", err
	}
	if reply == nil {
		return "", errNotFound
	}
	return replyString(reply), nil
}

func (r *redisEngine) health() error {
	if err := r.cmd.health(); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.eventsErr != nil {
		return unavailable{err: fmt.Errorf("announcements: %w", r.eventsErr)}
	}
	return nil
}

// find looks the token up in Redis and returns this node's channel for it,
// made now if this node had no subscriber of it.
func (r *redisEngine) find(_ context.Context, token string) (*channel, error) {
	h := r.h
	var f []any
	for try := 1; ; try++ {
		reads := r.hookReads.Load()
		reply, err := r.eval(findScript, r.prefix, token)
		if err != nil {
			return nil, err
		}
		var ok bool
		f, ok = reply.([]any)
		if reply == nil {
			return nil, errNotFound
		}
		if !ok || len(f) != 3 {
			return nil, fmt.Errorf("redis: unexpected channel %v", reply)
		}
		h.mu.Lock()
		// An edit announced since the script ran may be newer than the hook
		// URL it read, and applied already (or lost, before the channel was
		// here): read again. One announced later is applied after this.
		// Edits of every channel count, so that under a storm of them a
		// join still ends: after a few reads it keeps the last.
		if r.hookReads.Load() == reads || try == 4 {
			break
		}
		h.mu.Unlock()
	}
	defer h.mu.Unlock()
	pub, hook, tag := replyString(f[0]), replyOptional(f[1]), replyOptional(f[2])
	ch := h.bySubscriber[token]
	if ch == nil {
		ch = newChannel(pub, token, hook, tag)
		ch.shared = &sharedChannel{r: r}
		h.insert(ch)
		return ch, nil
	}
	ch.mu.Lock()
	defer ch.mu.Unlock()
	ch.shared.idle = 0
	ch.hookURL, ch.hookTarget = hook, ""
	if hook != nil {
		ch.hookTarget, _ = hookTarget(*hook) // checked when it was set
	}
	return ch, nil
}

// join counts the subscriber in Redis (so that every later publish, through
// any node, sees it), takes what waited for it, then adds it here at the
// point where this node's stream of the channel meets what the join
// returned: the subscriber gets the kept messages, then every message with
// a higher id, once each, in order.
func (r *redisEngine) join(ch *channel, s *subscriber, resume bool, lastID uint64) error {
	sh := ch.shared
	mode, from := "new", "0-0"
	if resume {
		mode, from = "resume", streamID(lastID)
	}
	receipt := r.node + ":" + strconv.FormatUint(r.joins.Add(1), 10)
	args := func() []any {
		return []any{r.prefix, ch.publisherToken, r.node, len(ch.subscribers) + sh.joining, nodeTTL.Milliseconds(),
			mode, from, r.backlog, r.backlogTTL.Milliseconds(), r.h.cfg.sendQueue, joinReadBytes, // s is new: its queue is empty
			receipt, joinReceiptTTL.Milliseconds()}
	}
	ch.mu.Lock()
	sh.joining++
	sh.sent = len(ch.subscribers) + sh.joining
	call := r.issueLocked(joinScript, args()...)
	ch.mu.Unlock()
	defer func() {
		ch.mu.Lock()
		sh.joining--
		sh.countChangedLocked(ch)
		ch.mu.Unlock()
	}()
	reply, err := call.wait()
	var re respError
	if errors.As(err, &re) && strings.HasPrefix(string(re), "NOSCRIPT") {
		ch.mu.Lock()
		call = r.cmd.sendLocked(false, append([]any{"EVAL", joinScript.src, 0}, args()...)...)
		ch.mu.Unlock()
		reply, err = call.wait()
	}
	f, ok := reply.([]any)
	switch {
	case err != nil:
		s.log().Warn("join through redis failed", "err", err)
		if u := (unavailable{}); errors.As(err, &u) && !u.unsent { // Redis may have run it
			r.mu.Lock()
			r.unsettled = append(r.unsettled, unsettledJoin{ch.publisherToken, receipt, time.Now()})
			r.mu.Unlock()
		}
		return err
	case reply == nil: // deleted since find
		return errNotFound
	case !ok || len(f) != 2:
		return fmt.Errorf("redis: unexpected join %v", reply)
	}
	last, _ := parseStreamID(replyString(f[0]))
	entries, _ := f[1].([]any)
	kept := make([]*message, 0, len(entries))
	for i := len(entries) - 1; i >= 0; i-- { // oldest first
		if m := entryMessage(entries[i]); m != nil {
			kept = append(kept, m)
		}
	}
	backlog := kept // what unjoin gives back; a resume took what others had too
	if resume {
		backlog = nil
	}
	for {
		sh.mu.Lock()
		switch {
		case !sh.following || sh.cursor == last:
			if !sh.following {
				sh.following, sh.cursor = true, last
			}
			full, queued := false, 0
			for _, m := range kept {
				if full = !s.enqueue(m); full {
					break
				}
				queued++
			}
			err := r.h.join(ch, s, false, 0)
			behind := sh.seen > sh.cursor
			target := sh.seen
			sh.mu.Unlock()
			if err != nil { // shutting down, or deleted, since Redis answered: no unjoin follows
				r.giveBack(ch, s, backlog)
				return err
			}
			ch.mu.Lock()
			s.fromBacklog = backlog[:min(queued, len(backlog))] // for unjoin, should the upgrade fail
			ch.mu.Unlock()
			if full { // handed, not queued: too slow, as when a publish finds its queue full
				s.log().Warn("subscriber too slow: disconnected", "queued", r.h.cfg.sendQueue)
				r.h.stats.slowDisconnects.Add(1)
				s.stop(farewell{closePolicyViolation, "too slow: send queue full", false})
				return nil
			}
			if behind { // announced before this node followed the channel
				if err := r.catchUp(ch, target); err != nil {
					s.log().Warn("catching up with the channel failed", "err", err)
				}
			}
			return nil
		case sh.cursor < last: // announcements still on their way: take them now
			sh.mu.Unlock()
			if err := r.catchUp(ch, last); err != nil {
				s.log().Warn("catching up with the channel failed", "err", err)
				r.giveBack(ch, s, backlog)
				return err
			}
		default: // this node handed out more since: the newcomer gets them too
			to := sh.cursor
			sh.mu.Unlock()
			more, err := r.between(ch.publisherToken, last, to, -1)
			if err != nil {
				s.log().Warn("reading the channel's stream failed", "err", err)
				r.giveBack(ch, s, backlog)
				return err
			}
			kept, last = append(kept, more...), to
		}
	}
}

// unjoin undoes a join whose upgrade failed: the subscriber leaves, and
// what the join took from the backlog waits for the next subscriber
// again, on any node, in its place among what waits.
func (r *redisEngine) unjoin(ch *channel, s *subscriber) {
	s.stop(farewell{closeGoingAway, "handshake failed", false})
	ch.mu.Lock()
	taken := s.fromBacklog
	s.fromBacklog = nil
	ch.mu.Unlock()
	r.giveBack(ch, s, taken)
}

// giveBack makes what a join took from the backlog, oldest first, and its
// subscriber never had, wait for the next subscriber again.
func (r *redisEngine) giveBack(ch *channel, s *subscriber, taken []*message) {
	if len(taken) == 0 {
		return
	}
	args := []any{r.prefix, ch.publisherToken}
	for _, m := range taken {
		args = append(args, streamID(m.id))
	}
	if _, err := r.eval(unjoinScript, args...); err != nil {
		s.log().Warn("giving back what a failed join took failed", "err", err)
	}
}

// countChangedLocked writes this node's count of the channel's subscribers
// when it changed. It is issued under ch.mu, so Redis applies the counts in
// the order they changed. The caller holds ch.mu.
func (sh *sharedChannel) countChangedLocked(ch *channel) {
	n := len(ch.subscribers) + sh.joining
	if n == sh.sent {
		return
	}
	sh.sent = n
	r := sh.r
	if n == 0 {
		r.cmd.sendLocked(true, "HDEL", r.nodeKey(), ch.publisherToken)
		return
	}
	r.cmd.sendLocked(true, "HSET", r.nodeKey(), ch.publisherToken, n)
	r.cmd.sendLocked(true, "PEXPIRE", r.nodeKey(), nodeTTL.Milliseconds())
}

// loadScripts makes a Redis that restarted know every script before
// anything else runs: a script issued under a lock (countsLost, join) then
// runs in that lock's order, rather than being sent again with EVAL after
// the lock is gone (NOSCRIPT), when a newer change may have come first.
func (r *redisEngine) loadScripts() {
	for _, s := range redisScripts {
		if _, err := r.cmd.do("SCRIPT", "LOAD", s.src); err != nil {
			r.h.log.Warn("loading scripts into redis failed", "err", err)
			return
		}
	}
}

// countsLost writes all of this node's counts again, after a reconnect
// (Redis may have lost them, or a count may not have reached it). Every
// channel is locked while they are read and the write is issued, so that no
// change of count can come between.
func (r *redisEngine) countsLost() {
	h := r.h
	h.mu.RLock()
	all := slices.Collect(maps.Values(h.byPublisher))
	args := []any{r.prefix, r.node, nodeTTL.Milliseconds()}
	for _, ch := range all {
		ch.mu.Lock()
		if sh := ch.shared; sh != nil {
			sh.sent = len(ch.subscribers) + sh.joining
			if sh.sent > 0 {
				args = append(args, ch.publisherToken, sh.sent)
			}
		}
	}
	call := r.issueLocked(rewriteScript, args...)
	for _, ch := range all {
		ch.mu.Unlock()
	}
	h.mu.RUnlock()
	if _, err := r.retry(call, rewriteScript, args); err != nil {
		var re respError
		if errors.As(err, &re) { // refused, not lost: a reconnect would not write them again
			r.recount.Store(true)
		}
		if ok, suppressed := r.cmd.failures.allow(time.Now(), redisFailureLogEvery); ok {
			r.h.log.Warn("writing this node's counts to redis failed", "err", err, "also_failed", suppressed)
		}
	}
}

// presence keeps this node alive in Redis while it has subscribers to
// count, writes its counts again when Redis lost them, and forgets channels
// without subscribers here. A node with nothing to count writes nothing:
// its next join puts it back in P:nodes.
func (r *redisEngine) presence() {
	t := time.NewTicker(presenceInterval)
	defer t.Stop()
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		}
		r.settleJoins()
		counting := r.forgetIdle()
		if r.recount.Swap(false) { // Redis refused a count (out of memory, say)
			r.countsLost()
			continue
		}
		if !counting {
			continue
		}
		if reply, err := r.eval(refreshScript, r.prefix, r.node, nodeTTL.Milliseconds()); err == nil && reply == int64(0) {
			r.countsLost()
		}
	}
}

// unsettledJoin is a join whose answer was lost after it was sent: Redis
// may have run it, and what it took waits for no subscriber.
type unsettledJoin struct {
	pub, receipt string
	at           time.Time
}

// settleJoins gives back, for the next subscriber, what the joins whose
// answers were lost took from the backlog, as their receipts say; a join
// without a receipt took nothing or did not run. What Redis cannot be
// asked now is tried again at the next presence round, while the receipt
// lives.
func (r *redisEngine) settleJoins() {
	r.mu.Lock()
	todo := r.unsettled
	r.unsettled = nil
	r.mu.Unlock()
	var left []unsettledJoin
	for i, j := range todo {
		if time.Since(j.at) > joinReceiptTTL {
			r.h.log.Warn("a lost join's receipt expired before it could be read: what it took from the backlog is dropped", "receipt", j.receipt)
			continue
		}
		if err := r.settle(j); err != nil {
			// The rest wait too: a Redis that does not answer would hold
			// this presence round redisCommandTimeout for each.
			left = append(left, todo[i:]...)
			break
		}
	}
	r.mu.Lock()
	r.unsettled = append(r.unsettled, left...)
	r.mu.Unlock()
}

func (r *redisEngine) settle(j unsettledJoin) error {
	key := r.prefix + "join:" + j.receipt
	reply, err := r.cmd.do("GET", key)
	if err != nil || reply == nil {
		return err
	}
	args := []any{r.prefix, j.pub}
	for id := range strings.FieldsSeq(replyString(reply)) {
		args = append(args, id)
	}
	if _, err := r.eval(unjoinScript, args...); err != nil {
		return err
	}
	r.h.log.Info("gave back what a lost join took from the backlog", "messages", len(args)-2)
	r.cmd.send(true, "DEL", key)
	return nil
}

// forgetIdle drops this node's copy of the channels that have had no
// subscriber here for localIdleRounds rounds, and says whether Redis holds
// a count of this node's (it was sent, if not yet applied).
func (r *redisEngine) forgetIdle() (counting bool) {
	h := r.h
	for _, ch := range h.all() {
		h.mu.Lock()
		ch.mu.Lock()
		if sh := ch.shared; sh != nil && h.byPublisher[ch.publisherToken] == ch {
			counting = counting || sh.sent > 0
			if len(ch.subscribers) > 0 || sh.joining > 0 || ch.connected > 0 {
				sh.idle = 0
			} else if sh.idle++; sh.idle >= localIdleRounds {
				delete(h.byPublisher, ch.publisherToken)
				delete(h.bySubscriber, ch.subscriberToken)
				ch.deleted = true
			}
		}
		ch.mu.Unlock()
		h.mu.Unlock()
	}
	return counting
}

// streamID is the Redis stream id of a message id: ms<<20 | seq.
func streamID(id uint64) string {
	return strconv.FormatUint(id>>20, 10) + "-" + strconv.FormatUint(id&(1<<20-1), 10)
}

// parseStreamID reads "ms-seq" as ms<<20 | seq.
func parseStreamID(s string) (uint64, bool) {
	msPart, seqPart, ok := strings.Cut(s, "-")
	ms, err1 := strconv.ParseUint(msPart, 10, 44)
	seq, err2 := strconv.ParseUint(seqPart, 10, 64)
	if !ok || err1 != nil || err2 != nil || seq >= 1<<20 {
		return 0, false
	}
	return ms<<20 | seq, true
}

// entryMessage reads a stream entry [id, [d, data, b, 0|1]].
func entryMessage(v any) *message {
	e, ok := v.([]any)
	if !ok || len(e) != 2 {
		return nil
	}
	id, ok := parseStreamID(replyString(e[0]))
	fields, _ := e[1].([]any)
	if !ok || len(fields) != 4 {
		return nil
	}
	data, _ := fields[1].([]byte)
	m := messageOf(data, replyString(fields[3]) == "1", time.Now())
	m.id = id
	return m
}

// between reads the messages of a channel's stream after id from, up to
// id to: the first count of them, or all for -1.
func (r *redisEngine) between(pub string, from, to uint64, count int) ([]*message, error) {
	args := []any{"XRANGE", r.prefix + "log:" + pub, "(" + streamID(from), streamID(to)}
	if count >= 0 {
		args = append(args, "COUNT", count)
	}
	reply, err := r.cmd.do(args...)
	if err != nil {
		return nil, err
	}
	entries, _ := reply.([]any)
	msgs := make([]*message, 0, len(entries))
	for _, e := range entries {
		if m := entryMessage(e); m != nil {
			msgs = append(msgs, m)
		}
	}
	return msgs, nil
}

// catchUp hands this node's subscribers of ch the messages up to id target
// that it has not handed them yet, from the stream, catchUpPage at a time:
// a gap may be as long as streamAwayLength, and one read of it all would
// hold Redis and this node's memory. What the stream no longer holds is
// skipped.
func (r *redisEngine) catchUp(ch *channel, target uint64) error {
	sh := ch.shared
	sh.mu.Lock()
	from := sh.cursor
	sh.mu.Unlock()
	for from < target {
		msgs, err := r.between(ch.publisherToken, from, target, catchUpPage)
		if err != nil {
			return fmt.Errorf("fill a gap in the channel's messages: %w", err)
		}
		sh.mu.Lock()
		for _, m := range msgs {
			if m.id > sh.cursor {
				r.deliverLocked(ch, m, nil)
			}
		}
		if len(msgs) < catchUpPage {
			sh.cursor = max(sh.cursor, target)
		}
		from = sh.cursor
		sh.mu.Unlock()
	}
	return nil
}

// deliverLocked hands m to this node's subscribers of ch, with the id Redis
// gave it; later as for hub.publish. The caller holds ch.shared.mu.
func (r *redisEngine) deliverLocked(ch *channel, m *message, later *[]*subscriber) {
	ch.mu.Lock()
	ch.lastID = m.id - 1 // the hub numbers it lastID+1: the stream's id on every node
	ch.mu.Unlock()
	r.h.publish(ch, m, later)
	ch.shared.cursor = m.id
}

// listen follows the announcements of every publish, edit and delete, on a
// Pub/Sub connection of its own, forever: after a loss it subscribes again,
// with backoff, and catches up from the streams.
func (r *redisEngine) listen() {
	backoff := redisBackoffMin
	for {
		up, err := r.follow()
		r.mu.Lock()
		r.eventsErr = err
		r.mu.Unlock()
		if r.ctx.Err() != nil {
			return
		}
		r.cmd.probe() // Redis going away closes the command connection too
		if up {
			backoff = redisBackoffMin
		}
		r.h.log.Warn("redis announcements lost; subscribing again", "err", err, "in", backoff)
		if !sleep(r.ctx, jitter(backoff)) {
			return
		}
		backoff = min(2*backoff, redisBackoffMax)
	}
}

// follow subscribes and reads announcements until the connection fails;
// up says whether it got as far as subscribing.
func (r *redisEngine) follow() (up bool, err error) {
	conn, err := r.h.cfg.redis.dial(r.ctx)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	defer context.AfterFunc(r.ctx, func() { conn.Close() })()
	var writing sync.Mutex
	write := func(args ...any) error {
		writing.Lock()
		defer writing.Unlock()
		if err := conn.SetWriteDeadline(time.Now().Add(redisCommandTimeout)); err != nil {
			return err
		}
		_, err := conn.Write(appendCommand(nil, args...))
		return err
	}
	br := bufio.NewReaderSize(conn, respMaxLine)
	if err := write("SUBSCRIBE", r.prefix+"events"); err != nil {
		return false, err
	}
	if err := conn.SetReadDeadline(time.Now().Add(redisCommandTimeout)); err != nil {
		return false, err
	}
	if reply, err := readReply(br); err != nil {
		return false, err
	} else if f, ok := reply.([]any); !ok || len(f) != 3 || replyString(f[0]) != "subscribe" {
		return false, fmt.Errorf("redis: SUBSCRIBE answered %v", reply)
	}
	// The probe: Redis answers PING on a subscribed connection, so silence
	// longer than redisSilenceLimit means the connection is dead.
	probing := make(chan struct{})
	defer close(probing)
	go func() {
		t := time.NewTicker(redisProbeInterval)
		defer t.Stop()
		for {
			select {
			case <-probing:
				return
			case <-t.C:
				if err := write("PING"); err != nil {
					conn.Close()
					return
				}
			}
		}
	}()
	// Announcements made while away are in the streams: catch up, then
	// read on (what was announced meanwhile waits in the socket). Until it
	// has caught up, the node is not healthy.
	for {
		err := r.resync()
		if err == nil {
			break
		}
		r.mu.Lock()
		r.eventsErr = fmt.Errorf("catching up: %w", err)
		r.mu.Unlock()
		r.h.log.Warn("catching up after a redis outage failed; trying again", "err", err)
		r.cmd.awaitUp(redisBackoffMax)
		if !sleep(r.ctx, jitter(redisBackoffMin)) {
			return true, r.ctx.Err()
		}
	}
	// Caught up: from now on the announcements keep this node up to date,
	// and the streams of its channels may be trimmed (publishScript).
	if err := write("SUBSCRIBE", r.prefix+"follow:"+r.node); err != nil {
		return true, err
	}
	r.mu.Lock()
	r.eventsErr = nil
	r.mu.Unlock()
	r.once[1].Do(func() { close(r.subscribed) })
	// Announcements read together are queued for the subscribers first,
	// and their writers started once the next one is not read yet: a burst
	// goes out in one write per subscriber, not one per message.
	var later []*subscriber
	defer startWriters(&later)
	for {
		// A reply already read whole needs no deadline: only a read that
		// may wait gets one.
		if buffered, _ := br.Peek(br.Buffered()); !respComplete(buffered) {
			startWriters(&later) // the next read may wait: write what was read
			if err := conn.SetReadDeadline(time.Now().Add(redisSilenceLimit)); err != nil {
				return true, err
			}
		}
		reply, err := readReply(br)
		if err != nil {
			if isTimeout(err) {
				err = fmt.Errorf("nothing from redis for %v, not even an answer to PING: %w", redisSilenceLimit, err)
			}
			return true, err
		}
		if f, ok := reply.([]any); ok && len(f) == 3 && replyString(f[0]) == "message" {
			payload, _ := f[2].([]byte)
			if err := r.announced(payload, &later); err != nil {
				// A gap that cannot be filled now: subscribe again, which
				// catches up once Redis answers.
				return true, err
			}
		}
	}
}

// announced acts on one announcement: "p PUB ID PREV BINARY DATA" (a
// publish), "e PUB HOOK" (an edit) or "d PUB" (a delete). An error is a gap
// in a channel's messages that could not be filled. later: as for
// hub.publish.
func (r *redisEngine) announced(a []byte, later *[]*subscriber) error {
	kind, rest, _ := bytes.Cut(a, []byte(" "))
	if string(kind) == "e" {
		r.hookReads.Add(1) // before the lookup: see find
	}
	pubBytes, rest, _ := bytes.Cut(rest, []byte(" "))
	ch := r.h.byPublisherToken(string(pubBytes))
	if ch == nil || ch.shared == nil {
		return nil // no subscriber of it here
	}
	switch string(kind) {
	case "p":
		idPart, rest, _ := bytes.Cut(rest, []byte(" "))
		prevPart, rest, _ := bytes.Cut(rest, []byte(" "))
		binaryPart, data, _ := bytes.Cut(rest, []byte(" "))
		id, ok1 := parseStreamID(string(idPart))
		prev, ok2 := parseStreamID(string(prevPart))
		if !ok1 || !ok2 {
			r.h.log.Warn("malformed announcement from redis", "bytes", len(a))
			return nil
		}
		m := messageOf(data, string(binaryPart) == "1", time.Now())
		m.id = id
		return r.received(ch, m, prev, later)
	case "e":
		var hook *string
		if len(rest) > 0 {
			s := string(rest)
			hook = &s
		}
		r.setHook(ch, hook)
	case "d":
		r.deleted(ch)
	}
	return nil
}

// received hands an announced message to this node's subscribers, in
// stream order: the next one at once; after a gap, the missing ones first,
// from the stream. later: as for hub.publish.
func (r *redisEngine) received(ch *channel, m *message, prev uint64, later *[]*subscriber) error {
	sh := ch.shared
	sh.mu.Lock()
	switch {
	case !sh.following:
		sh.seen = max(sh.seen, m.id)
		sh.mu.Unlock()
		return nil
	case m.id <= sh.cursor:
		sh.mu.Unlock()
		return nil
	case prev == sh.cursor:
		r.deliverLocked(ch, m, later)
		sh.mu.Unlock()
		return nil
	}
	sh.mu.Unlock()
	return r.catchUp(ch, m.id)
}

func (r *redisEngine) setHook(ch *channel, hook *string) {
	var target string
	if hook != nil {
		target, _ = hookTarget(*hook) // checked when it was set
	}
	ch.mu.Lock()
	ch.hookURL, ch.hookTarget = hook, target
	ch.mu.Unlock()
}

// deleted closes this node's subscribers of a channel deleted on any node.
func (r *redisEngine) deleted(ch *channel) {
	if _, ok := r.h.delete(ch, farewell{closeNormal, "channel deleted", true}, 0); ok {
		r.cmd.send(true, "HDEL", r.nodeKey(), ch.publisherToken)
	}
}

// resync brings this node's channels up to date after the announcements
// were lost for a while: deleted ones close, hook URLs are read again, and
// messages missed are handed out from the streams. It returns the first
// error; what it could do, it did.
func (r *redisEngine) resync() error {
	type check struct {
		ch   *channel
		call *redisCall
	}
	var checks []check
	r.hookReads.Add(1) // see find
	for _, ch := range r.h.all() {
		if ch.shared != nil {
			checks = append(checks, check{ch, r.cmd.send(false, "HMGET", r.prefix+"ch:"+ch.publisherToken, "sub", "hook", "last")})
		}
	}
	var failure error
	for _, c := range checks {
		reply, err := c.call.wait()
		f, ok := reply.([]any)
		if err == nil && (!ok || len(f) != 3) {
			err = fmt.Errorf("redis: HMGET answered %v", reply)
		}
		if err != nil {
			failure = cmp.Or(failure, err)
			continue
		}
		if f[0] == nil {
			r.deleted(c.ch)
			continue
		}
		r.setHook(c.ch, replyOptional(f[1]))
		c.ch.shared.mu.Lock()
		following := c.ch.shared.following
		c.ch.shared.mu.Unlock()
		if last, ok := parseStreamID(replyString(f[2])); ok && following {
			failure = cmp.Or(failure, r.catchUp(c.ch, last))
		}
	}
	return failure
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
// sent, and whether the messages still queued go out first (drain).
type farewell struct {
	code   int
	reason string
	drain  bool
}

// subscriber is one connection to a channel: a WebSocket or an SSE stream.
// One write at a time is under way (busy): a publisher's, for a message it
// writes itself (offer), or a writer goroutine's, which runs only while
// something waits to be written (wakeLocked). A WebSocket has a reader
// goroutine for its whole life; an SSE stream has nothing to read, and its
// handler goroutine waits for the goodbye. stop ends them. What it sends
// for the hook waits in its own queue, which the hub's hook workers serve,
// and may outlive it.
type subscriber struct {
	id        uint64
	hub       *hub
	ch        *channel
	transport string // "websocket" or "sse"

	index       int        // in ch.subscribers, guarded by ch.mu; -1 once removed
	joined      bool       // set by join, under ch.mu: stop reports a disconnect only then
	fromBacklog []*message // what join handed over from the backlog, under ch.mu

	mu          sync.Mutex
	peer        peer        // set when serving starts
	out         *frameBatch // a WebSocket over TCP: publishers may write to it (offer)
	queue       []*message  // waiting for the writer
	rest        []byte      // of a frame a publisher began: written first, counts as a message
	busy        bool        // a write is under way, by the writer or a publisher
	pong        []byte      // payload of a ping to answer, nil if none
	pingDue     bool        // time to ping (SSE: to send a heartbeat)
	writing     int         // messages the writer has taken: they count against sendQueue
	bye         farewell    // set once, by stop
	sendUntil   time.Time   // set by stop: no message starts after it
	closeBy     time.Time   // set by stop: every write ends by then
	broken      bool        // a write failed: the stream may hold half a frame
	hookPending *hookQueue  // made by its first item; guarded by hub.hookWork.mu, not mu

	writer   bool        // a writer goroutine runs (or has said goodbye), under mu
	pinger   *time.Timer // sets pingDue every interval
	stopping atomic.Bool // stop has run: the writer checks sendUntil between messages
	stopOnce sync.Once
	done     chan struct{} // closed when the writer has said goodbye
}

func (h *hub) newSubscriber(ch *channel, transport string) *subscriber {
	id := h.lastSubscriberID.Add(1)
	return &subscriber{
		id:        id,
		hub:       h,
		ch:        ch,
		transport: transport,
		index:     -1,
		done:      make(chan struct{}),
	}
}

// log is the subscriber's logger, built when it logs: most never do.
func (s *subscriber) log() *slog.Logger {
	return s.hub.log.With("channel", fingerprint(s.ch.subscriberToken), "subscriber", s.id, "transport", s.transport)
}

// debugging says whether debug lines are logged, for those a subscriber
// logs in any case (connected, disconnected).
func (s *subscriber) debugging() bool {
	return s.hub.log.Enabled(context.Background(), slog.LevelDebug)
}

// serveWebSocket starts the reader of an upgraded subscriber and returns:
// net/http's handler goroutine, with its deep stack and its buffers, ends
// at the upgrade instead of living as long as the connection.
func (s *subscriber) serveWebSocket(ws *websocket.Conn, conn *keptConn, out *frameBatch) {
	direct := out
	if out.fd < 0 {
		direct = nil // TLS: publishers cannot write to it at once
	}
	s.begin(wsPeer{ws, out}, direct)
	go s.read(ws, conn)
}

// read is a WebSocket subscriber's reader: it reads until the end, waits
// for the writer to finish, then closes the connection.
func (s *subscriber) read(ws *websocket.Conn, conn *keptConn) {
	defer s.hub.release(s.ch)
	s.stop(s.readLoop(ws, conn.in))
	<-s.done
	if err := conn.Conn.Close(); err != nil {
		s.log().Debug("close", "err", err)
	}
	if s.debugging() {
		s.log().Debug("subscriber disconnected", "code", s.bye.code, "reason", s.bye.reason)
	}
}

// serveSSE is the life of an SSE subscriber, run by the handler goroutine,
// which waits for the goodbye while writers write: an event stream has
// nothing to read, and its response must not end before.
func (s *subscriber) serveSSE(p *ssePeer) {
	s.begin(p, nil)
	<-s.done
	if s.debugging() {
		s.log().Debug("subscriber disconnected", "reason", s.bye.reason)
	}
}

// begin lets writes start: a writer runs when there is something to write
// (what join took from the backlog, a ping every interval). out is set
// for a WebSocket over TCP, which publishers may write to.
func (s *subscriber) begin(p peer, out *frameBatch) {
	s.mu.Lock()
	s.peer, s.out = p, out
	s.pinger = time.AfterFunc(s.pingInterval(), s.pingNow)
	start := s.wakeLocked()
	s.mu.Unlock()
	if start {
		go s.writeLoop()
	}
	s.ch.mu.Lock()
	s.fromBacklog = nil // only unjoin needed it
	s.ch.mu.Unlock()
	if s.debugging() {
		s.log().Debug("subscriber connected")
	}
}

// pingInterval is how often the writer pings (SSE: a comment line, often
// enough that proxies, nginx after 60 s, keep an idle stream open).
func (s *subscriber) pingInterval() time.Duration {
	if s.transport == "sse" {
		return min(s.hub.cfg.pingInterval, sseHeartbeat)
	}
	return s.hub.cfg.pingInterval
}

// pingNow is the pinger's: time to ping.
func (s *subscriber) pingNow() {
	s.mu.Lock()
	s.pingDue = true
	start := s.wakeLocked()
	s.mu.Unlock()
	if start {
		go s.writeLoop()
	}
}

// stop ends the subscriber once: it leaves the channel at once, so that
// listeners is exact, and the writer says goodbye. From here every write
// ends by closeBy, the write under way included: drainWait for an orderly
// close, closeGrace otherwise. The writer starts no message after
// sendUntil, so that a peer that still reads gets whole messages, then the
// close frame.
func (s *subscriber) stop(bye farewell) {
	s.stopOnce.Do(func() {
		listeners := s.ch.leave(s)
		s.mu.Lock()
		s.bye = bye
		now := time.Now()
		s.sendUntil, s.closeBy = now, now.Add(closeGrace)
		if bye.drain {
			s.closeBy = now.Add(drainWait)
			s.sendUntil = s.closeBy.Add(-closeGrace)
		}
		s.stopping.Store(true)
		if s.peer != nil && !s.broken {
			if err := s.peer.setWriteDeadline(s.closeBy); err != nil {
				s.log().Debug("set write deadline", "err", err)
			}
		}
		s.mu.Unlock()
		s.signal()
		if s.joined { // leave, under ch.mu, ordered this read after join's write
			s.presence("disconnect", listeners, &bye, s.ch.hookDestination())
		}
	})
}

// enqueue hands a message to the writer without blocking; false when the
// subscriber is too far behind.
func (s *subscriber) enqueue(m *message) bool {
	s.mu.Lock()
	queued, start := s.queueLocked(m)
	s.mu.Unlock()
	if start {
		go s.writeLoop()
	}
	return queued
}

// queueLocked queues m when there is room, and says whether it did and
// whether the caller, once it has let go of s.mu, starts a writer.
func (s *subscriber) queueLocked(m *message) (queued, start bool) {
	if !s.roomLocked() {
		return false, false
	}
	s.queue = append(s.queue, m)
	return true, s.wakeLocked()
}

// roomLocked says whether one more message may wait: what is queued, what
// the writer has taken and a frame begun count. The caller holds s.mu.
func (s *subscriber) roomLocked() bool {
	n := len(s.queue) + s.writing
	if s.rest != nil {
		n++
	}
	return n < s.hub.cfg.sendQueue
}

// What offer did with a message.
const (
	claimed  = iota // the publisher writes it (writeClaimed)
	enqueued        // the writer will
	full            // neither: the subscriber is too far behind
)

// offer is where a publisher, holding ch.mu, either claims the subscriber
// to write m itself or queues m. It claims only a WebSocket over TCP with
// nothing queued, no frame half written and no write under way, that is
// not closing: then m is next on the wire whoever writes it, and nothing
// else writes until writeClaimed ends the claim. This is the one place
// that rule lives; the writer takes nothing while a claim holds (busy).
// With later it never claims, and a writer to start is added to *later
// (see publish).
func (s *subscriber) offer(m *message, later *[]*subscriber) int {
	s.mu.Lock()
	if later == nil && s.out != nil && !s.busy && len(s.queue) == 0 && s.rest == nil && !s.broken && s.bye.code == 0 {
		s.busy = true
		s.mu.Unlock()
		return claimed
	}
	queued, start := s.queueLocked(m)
	s.mu.Unlock()
	switch {
	case start && later != nil:
		*later = append(*later, s)
	case start:
		go s.writeLoop()
	}
	if !queued {
		return full
	}
	return enqueued
}

// startWriters starts the writers that publish left to its caller, and
// empties the list. Until then each is marked as running: nothing else
// starts it, and what comes meanwhile is queued for it.
func startWriters(later *[]*subscriber) {
	for _, s := range *later {
		go s.writeLoop()
	}
	clear(*later)
	*later = (*later)[:0]
}

// writeClaimed makes one write of m's frame that does not wait, then ends
// the claim. What the kernel did not take is left for the writer, ahead of
// anything queued since; it wakes the writer when that or anything else
// waits. It says whether the whole frame went.
func (s *subscriber) writeClaimed(m *message) bool {
	n, err := writeNow(s.out.fd, m.frame)
	s.mu.Lock()
	s.busy = false
	switch {
	case err != nil:
		s.broken = true
	case n < len(m.frame):
		s.rest = m.frame[n:]
	}
	start := s.wakeLocked()
	s.mu.Unlock()
	if start {
		go s.writeLoop()
	}
	if err != nil {
		s.log().Debug("write failed", "err", err)
		s.hub.stats.droppedGone.Add(1)
		s.stop(farewell{closeGoingAway, "write failed", false})
		return false
	}
	return n == len(m.frame)
}

// wakeLocked says whether a writer goroutine is to start, and marks it
// started: when there is something to write, none runs, no publisher
// writes (its writeClaimed wakes one after) and serving has begun. The
// caller holds s.mu and starts writeLoop when told to.
func (s *subscriber) wakeLocked() bool {
	if s.writer || s.busy || s.peer == nil || !s.hasWorkLocked() {
		return false
	}
	s.writer = true
	return true
}

func (s *subscriber) hasWorkLocked() bool {
	return s.bye.code != 0 || s.pingDue || s.pong != nil || s.rest != nil || len(s.queue) > 0
}

// signal starts a writer if there is something to write and none runs.
func (s *subscriber) signal() {
	s.mu.Lock()
	start := s.wakeLocked()
	s.mu.Unlock()
	if start {
		go s.writeLoop()
	}
}

// readLoop reads frames until the connection ends and says how to close
// it. It never writes: pings are answered by the writer. Any frame from the
// peer, pongs included, proves it alive for two more ping intervals. After
// a bad frame it sends our close and discards what follows until the
// peer's close, so that the peer can read ours.
// x/net/websocket reads the frames; in is the buffered reader it reads
// them from, where the reader peeks at the one bit x/net clears.
func (s *subscriber) readLoop(ws *websocket.Conn, in *bufio.Reader) farewell {
	lost := farewell{closeGoingAway, "connection lost", false}
	var msg []byte
	var msgType byte
	inMessage, failed := false, false
	for {
		s.extendReadDeadline()
		h, fr, err := nextFrame(ws, in)
		if isTimeout(err) {
			return farewell{closeGoingAway, "ping timeout", false}
		} else if err != nil {
			return lost
		}
		if !failed {
			if bye, bad := h.problem(inMessage, int64(len(msg)), s.hub.cfg.maxMessageBytes); bad {
				failed = true
				s.stop(bye)
			}
		}
		if h.opcode == websocket.CloseFrame && h.length >= 0 && h.length <= 125 {
			payload, err := readPayload(fr, nil, h.length)
			if err != nil {
				return lost
			}
			return farewell{peerCloseCode(payload), "closed by peer", false}
		}
		if failed {
			if h.length < 0 {
				// Where this frame ends cannot be known: no frame follows,
				// but what arrives is read until the peer goes or the
				// close grace ends, as closing with unread bytes would
				// reset the connection and lose our close frame.
				if _, err := io.Copy(io.Discard, in); err != nil && !isTimeout(err) {
					s.log().Debug("discard after a bad frame", "err", err)
				}
				return lost
			}
			if _, err := io.Copy(io.Discard, fr); err != nil {
				return lost
			}
			continue
		}
		switch h.opcode {
		case websocket.PingFrame, websocket.PongFrame:
			payload, err := readPayload(fr, make([]byte, 0, h.length), h.length) // not nil: nil is no pong
			if err != nil {
				return lost
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
		if msg, err = readPayload(fr, msg, h.length); err != nil {
			return lost
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
		msg = nil // the hook worker owns it now
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
	if err := s.peer.setReadDeadline(time.Now().Add(2 * s.hub.cfg.pingInterval)); err != nil {
		s.log().Debug("set read deadline", "err", err)
	}
}

type frameHeader struct {
	fin, rsv, masked bool
	opcode           byte
	length           int64 // of the payload; negative when its top bit is set
}

// nextFrame peeks at the next frame's header for the top bit of a 64-bit
// length, which RFC 6455 (5.2) says must be 0 and x/net's frame reader
// clears, then lets x/net read the frame and reads the header bits it
// parsed but does not expose.
func nextFrame(ws *websocket.Conn, in *bufio.Reader) (frameHeader, io.Reader, error) {
	start, err := in.Peek(2)
	if err != nil {
		return frameHeader{}, nil, err
	}
	topBit := false
	if start[1]&0x7f == 127 {
		if start, err = in.Peek(3); err != nil {
			return frameHeader{}, nil, err
		}
		topBit = start[2]&0x80 != 0
	}
	fr, err := ws.NewFrameReader()
	if err != nil {
		return frameHeader{}, nil, err
	}
	header, ok := fr.HeaderReader().(interface{ Bytes() []byte })
	if !ok || len(header.Bytes()) < 2 {
		return frameHeader{}, nil, errors.New("x/net/websocket: frame header unreadable")
	}
	raw := header.Bytes()
	h := frameHeader{
		fin:    raw[0]&0x80 != 0,
		rsv:    raw[0]&0x70 != 0,
		opcode: raw[0] & 0x0f,
		masked: raw[1]&0x80 != 0,
		length: int64(fr.Len() - len(raw)), // x/net's int overflow, if any, cancels out
	}
	if topBit {
		h.length = -1
	}
	return h, fr, nil
}

// readPayload appends a frame's payload of length bytes, unmasked by x/net,
// to buf. It makes room as the bytes arrive, at most doubling it, never
// beyond the end of the frame: a header alone can declare a message of
// -max-message-bytes, and must not cost them. A finished message's buffer
// is exactly its size.
func readPayload(fr io.Reader, buf []byte, length int64) ([]byte, error) {
	end := len(buf) + int(length)
	for len(buf) < end {
		if len(buf) == cap(buf) {
			room := min(end-len(buf), max(len(buf), payloadChunk))
			buf = append(make([]byte, 0, len(buf)+room), buf...)
		}
		n, err := fr.Read(buf[len(buf):min(cap(buf), end)])
		buf = buf[:len(buf)+n]
		if err != nil && len(buf) < end {
			if err == io.EOF { // x/net's frame reader ends where the connection did
				err = io.ErrUnexpectedEOF
			}
			return buf, err
		}
	}
	return buf, nil
}

// problem says what is wrong with a frame, given the message it may
// continue, the bytes of it read so far and the largest message allowed.
func (h frameHeader) problem(inMessage bool, msgBytes, limit int64) (farewell, bool) {
	control := h.opcode >= websocket.CloseFrame
	switch {
	case !h.masked || h.rsv:
		return farewell{closeProtocolError, "client frames must be masked and use no extensions", false}, true
	case h.length < 0:
		return farewell{closeProtocolError, "the top bit of a frame length must be 0", false}, true
	case control && (!h.fin || h.length > 125):
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
	case h.length > limit-msgBytes:
		return farewell{closeTooBig, "message too big", false}, true
	}
	return farewell{}, false
}

// peerCloseCode is the code to echo to a peer's close frame: its own when
// that is a code a peer may send (RFC 6455, 7.4), else 1002; 1007 when its
// reason is not UTF-8.
func peerCloseCode(payload []byte) int {
	switch {
	case len(payload) == 0:
		return closeNormal
	case len(payload) == 1:
		return closeProtocolError // a code is two bytes
	case !utf8.Valid(payload[2:]):
		return closeInvalidData
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

// writeLoop is the writer: it runs while there is something to write
// that no publisher writes (queued messages, the rest of a frame a
// publisher began, pongs, pings or SSE heartbeats, the goodbye), one at a
// time (wakeLocked), and ends when nothing is left, so that an idle
// subscriber has no goroutine for writing. After the goodbye none starts
// again.
func (s *subscriber) writeLoop() {
	var batch []*message
	for {
		s.mu.Lock()
		if s.busy || !s.hasWorkLocked() { // busy: a publisher writes, and wakes a writer after
			s.writer = false
			if s.queue == nil {
				s.queue = batch[:0] // for the next messages queued, instead of a new slice
			}
			s.mu.Unlock()
			return
		}
		bye, ping, pong, rest := s.bye, s.pingDue, s.pong, s.rest
		batch, s.queue = s.queue, batch[:0]
		s.writing = len(batch)
		if rest != nil {
			s.writing++
		}
		s.busy, s.rest = true, nil
		s.pingDue, s.pong = false, nil
		s.mu.Unlock()
		if bye.code != 0 {
			s.pinger.Stop()
			s.finish(bye, batch, rest) // busy and writer stay: nobody writes after the goodbye
			close(s.done)
			return
		}
		if ping {
			s.pinger.Reset(s.pingInterval())
		}
		err := s.write(batch, rest, pong, ping)
		s.mu.Lock()
		s.writing, s.busy = 0, false
		s.mu.Unlock()
		if err != nil {
			s.log().Debug("write failed", "err", err)
			s.stop(farewell{closeGoingAway, "write failed", false})
		}
		clear(batch)
	}
}

// write sends the rest of a frame a publisher began, a ping, a pong and
// the messages of batch, each write within writeWait (or by closeBy, once
// stopping). Once stopping it starts no message after sendUntil; what it
// leaves out is counted as dropped. A failed write marks the stream
// broken: nothing more is written to it.
func (s *subscriber) write(batch []*message, rest, pong []byte, ping bool) (err error) {
	if len(batch) == 0 && rest == nil && pong == nil && !ping {
		return nil
	}
	total, sent := len(batch), 0
	if rest != nil {
		total++ // the message it ends
	}
	defer func() {
		if err != nil {
			s.mu.Lock()
			s.broken = true
			s.mu.Unlock()
			sent = 0 // the last of them may be cut, and nothing tells how many the peer has
		}
		s.countDropped(total - sent)
	}()
	if rest != nil {
		s.out.gather()
		if _, err := s.out.Write(rest); err != nil {
			s.out.end(false)
			return err
		}
		sent++
	}
	if s.transport == "sse" { // a WebSocket's frameBatch arms only before a write that would block
		if err := s.armWrite(writeWait); err != nil {
			return err
		}
	}
	if ping {
		if err := s.peer.ping(); err != nil {
			return err
		}
	}
	if pong != nil {
		if err := s.peer.pong(pong); err != nil {
			return err
		}
	}
	for _, m := range batch {
		if s.stopping.Load() && s.pastSendUntil() {
			break
		}
		if err := s.peer.send(m); err != nil {
			return err
		}
		sent++
	}
	if err := s.peer.flush(); err != nil {
		return err
	}
	s.hub.stats.delivered.Add(int64(sent))
	return nil
}

func (s *subscriber) pastSendUntil() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !time.Now().Before(s.sendUntil)
}

// countDropped counts n messages that were queued and not sent: too slow,
// or gone.
func (s *subscriber) countDropped(n int) {
	if n == 0 {
		return
	}
	s.mu.Lock()
	slow := s.bye.code == closePolicyViolation
	s.mu.Unlock()
	if slow {
		s.hub.stats.droppedSlow.Add(int64(n))
	} else {
		s.hub.stats.droppedGone.Add(int64(n))
	}
}

// finish says goodbye: the end of a frame a publisher began, what is
// still queued when the close is orderly (as much as starts before
// sendUntil), then the close frame (SSE: a close event); then it lets a
// WebSocket's reader wait briefly for the peer's close frame, or not at
// all when the stream is broken: nothing can follow half a frame.
func (s *subscriber) finish(bye farewell, batch []*message, rest []byte) {
	s.mu.Lock()
	batch = append(batch, s.queue...) // stop has taken s out of the channel: nothing more comes
	s.queue = nil
	s.mu.Unlock()
	if !bye.drain {
		s.countDropped(len(batch))
		batch = nil // only the frame under way ends
	}
	if err := s.write(batch, rest, nil, false); err != nil {
		s.log().Debug("final flush", "err", err)
	}
	err := s.armWrite(closeGrace)
	if err == nil {
		err = s.peer.goodbye(bye)
	}
	if err != nil {
		s.log().Debug("write goodbye", "err", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	end := time.Now()
	if !s.broken {
		end = end.Add(closeGrace)
	}
	if err := s.peer.setReadDeadline(end); err != nil {
		s.log().Debug("set read deadline", "err", err)
	}
}

// disarmWrite clears the write deadline after a write that had to wait,
// so that the next write need not set one unless it waits too; once
// closing, closeBy stands.
func (s *subscriber) disarmWrite() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closeBy.IsZero() {
		return nil
	}
	return s.peer.setWriteDeadline(time.Time{})
}

// armWrite sets the write deadline, wait from now but never past closeBy,
// unless a write has failed: then the stream may end in half a frame, and
// nothing more may follow it.
func (s *subscriber) armWrite(wait time.Duration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.broken {
		return errors.New("an earlier write failed")
	}
	deadline := time.Now().Add(wait)
	if !s.closeBy.IsZero() && s.closeBy.Before(deadline) {
		deadline = s.closeBy
	}
	if err := s.peer.setWriteDeadline(deadline); err != nil {
		return fmt.Errorf("set write deadline: %w", err)
	}
	return nil
}

// peer is the far end of a subscriber. The writer calls it; deadlines may
// also be set by stop and by a WebSocket's reader, under s.mu.
type peer interface {
	send(m *message) error // flush sends what send wrote
	flush() error
	ping() error
	pong(payload []byte) error
	goodbye(bye farewell) error
	setWriteDeadline(t time.Time) error
	setReadDeadline(t time.Time) error
}

// wsPeer writes to a WebSocket subscriber: each message as the frame
// built once for it (newMessage), control frames through x/net/websocket,
// whose buffered writer flushes into out.
type wsPeer struct {
	ws  *websocket.Conn
	out *frameBatch
}

func (p wsPeer) send(m *message) error {
	p.out.gather()
	if _, err := p.out.Write(m.frame); err != nil {
		p.out.end(false)
		return err
	}
	return nil
}

func (p wsPeer) flush() error              { return p.out.end(true) }
func (p wsPeer) ping() error               { return p.frame(websocket.PingFrame, nil) }
func (p wsPeer) pong(payload []byte) error { return p.frame(websocket.PongFrame, payload) }

func (p wsPeer) goodbye(bye farewell) error {
	payload := make([]byte, 2, 2+len(bye.reason))
	payload[0], payload[1] = byte(bye.code>>8), byte(bye.code)
	if err := p.frame(websocket.CloseFrame, append(payload, bye.reason...)); err != nil {
		return err
	}
	return p.out.end(true)
}

func (p wsPeer) setWriteDeadline(t time.Time) error { return p.ws.SetWriteDeadline(t) }
func (p wsPeer) setReadDeadline(t time.Time) error  { return p.ws.SetReadDeadline(t) }

// frame gathers a control frame, written by x/net/websocket.
func (p wsPeer) frame(opcode byte, payload []byte) error {
	p.out.gather()
	w, err := p.ws.NewFrameWriter(opcode)
	if err != nil {
		p.out.end(false)
		return fmt.Errorf("new frame: %w", err)
	}
	if _, err := w.Write(payload); err != nil {
		p.out.end(false)
		return fmt.Errorf("write frame: %w", err)
	}
	if err := w.Close(); err != nil {
		p.out.end(false)
		return fmt.Errorf("write frame: %w", err)
	}
	return nil
}

// frameBatch is a WebSocket subscriber's way out. Between gather and end
// it collects frames in a buffer lent by the hub, so that an idle
// subscriber holds none, and writes them at once (outside a batch, only
// x/net's answer to the handshake passes, straight through). A write to a
// TCP socket first tries without waiting: only when the kernel cannot
// take it all does the rest wait, under a write deadline armed then, and
// only then.
type frameBatch struct {
	conn   net.Conn
	fd     int // of conn when it is TCP; -1 for TLS, where every write is armed
	pool   *sync.Pool
	arm    func() error // sets the write deadline, or says the peer is abandoned
	disarm func() error // clears it after a write that waited
	buf    *[]byte      // lent between gather and end
}

func (b *frameBatch) Write(p []byte) (int, error) {
	if b.buf == nil {
		return b.conn.Write(p)
	}
	if len(p) >= batchBytes { // too big to copy: what was gathered, then p
		if err := b.send(); err != nil {
			return 0, err
		}
		if err := b.write(p); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	*b.buf = append(*b.buf, p...)
	if len(*b.buf) >= batchBytes {
		if err := b.send(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

func (b *frameBatch) gather() {
	if b.buf == nil {
		b.buf = b.pool.Get().(*[]byte)
		*b.buf = (*b.buf)[:0]
	}
}

// send writes what was gathered.
func (b *frameBatch) send() error {
	if len(*b.buf) == 0 {
		return nil
	}
	err := b.write(*b.buf)
	*b.buf = (*b.buf)[:0]
	return err
}

// write writes p: at once when the kernel takes it all, else the rest
// under the write deadline.
func (b *frameBatch) write(p []byte) error {
	if b.fd >= 0 {
		n, err := writeNow(b.fd, p)
		if err != nil {
			return err
		}
		if p = p[n:]; len(p) == 0 {
			return nil
		}
	}
	if err := b.arm(); err != nil {
		return err
	}
	if _, err := b.conn.Write(p); err != nil {
		return err
	}
	if b.fd >= 0 {
		return b.disarm()
	}
	return nil
}

// end writes what was gathered, or drops it, and gives the buffer back.
func (b *frameBatch) end(write bool) error {
	if b.buf == nil {
		return nil
	}
	var err error
	if write {
		err = b.send()
	}
	if cap(*b.buf) <= 2*batchBytes {
		*b.buf = (*b.buf)[:0]
		b.pool.Put(b.buf)
	}
	b.buf = nil
	return err
}

// writeNow makes one write to a socket that does not wait (MSG_DONTWAIT;
// Go makes every socket non-blocking in any case), and says how much of p
// the kernel took (none when its buffer is full); a peer that has gone is
// an error (EPIPE; the runtime ignores the SIGPIPE that comes with it, as
// for any write to a socket).
//
// It writes to the descriptor itself, without RawConn.Write's lock and
// poller reset (a quarter of the daemon's user time in a fan-out): the
// descriptor stays open meanwhile, as only the subscriber's reader closes
// it, after the writer's goodbye, and neither the writer nor its goodbye
// runs while a write is under way (busy). It is a raw system call, as it
// cannot block: the goroutine keeps its P, where a fan-out of plain system
// calls keeps the scheduler's monitor waking every 20 µs to take Ps away
// from them, start threads to run them and park those after. And it is
// send(2) rather than write(2): the same for a socket, without the checks
// write makes for any file (about 5% less CPU in a fan-out).
func writeNow(fd int, p []byte) (int, error) {
	n, _, errno := syscall.RawSyscall6(syscall.SYS_SENDTO, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)), syscall.MSG_DONTWAIT, 0, 0)
	switch {
	case errno == syscall.EAGAIN || errno == syscall.EINTR:
		return 0, nil
	case errno != 0:
		return 0, fmt.Errorf("write: %w", errno)
	}
	return int(n), nil
}

// ssePeer writes Server-Sent Events. Each message is an event with its id,
// so that a reconnecting EventSource resumes where it stopped
// (Last-Event-ID); binary messages are sent base64 as "event: binary". An
// event goes in pieces into the response's own buffer: a subscriber holds
// no copy of a message, and makes none to send it.
type ssePeer struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func (p *ssePeer) send(m *message) error {
	e := &eventWriter{w: p.w}
	e.WriteString("id: " + strconv.FormatUint(m.id, 10))
	if m.binary {
		e.WriteString("\nevent: binary\ndata: ")
		b64 := base64.NewEncoder(base64.StdEncoding, e) // in pieces of 1 KiB
		_, _ = b64.Write(m.data)                        // errors are kept in e
		_ = b64.Close()
	} else {
		// EventSource ends a line at \r\n, \r or \n: each becomes a data
		// line of its own, and the browser joins them with \n.
		data := m.data
		for {
			end := bytes.IndexAny(data, "\r\n")
			if end < 0 {
				break
			}
			e.WriteString("\ndata: ")
			_, _ = e.Write(data[:end])
			if data[end] == '\r' && end+1 < len(data) && data[end+1] == '\n' {
				end++
			}
			data = data[end+1:]
		}
		e.WriteString("\ndata: ")
		_, _ = e.Write(data)
	}
	e.WriteString("\n\n")
	return e.err
}

// eventWriter writes the pieces of an event until one fails, and keeps
// that error.
type eventWriter struct {
	w   io.Writer
	err error
}

func (e *eventWriter) Write(p []byte) (int, error) {
	if e.err == nil {
		_, e.err = e.w.Write(p)
	}
	return len(p), e.err
}

func (e *eventWriter) WriteString(s string) {
	if e.err == nil {
		_, e.err = io.WriteString(e.w, s)
	}
}

func (p *ssePeer) flush() error { return p.rc.Flush() }

func (p *ssePeer) ping() error { return p.write(": ping\n\n") }

func (p *ssePeer) pong([]byte) error { return nil }

func (p *ssePeer) goodbye(bye farewell) error {
	data, err := json.Marshal(struct {
		Code   int    `json:"code"`
		Reason string `json:"reason"`
	}{bye.code, bye.reason})
	if err != nil {
		return err
	}
	return p.write("event: close\ndata: " + string(data) + "\n\n")
}

func (p *ssePeer) setWriteDeadline(t time.Time) error { return p.rc.SetWriteDeadline(t) }
func (p *ssePeer) setReadDeadline(time.Time) error    { return nil }

func (p *ssePeer) write(s string) error {
	if _, err := io.WriteString(p.w, s); err != nil {
		return err
	}
	return p.rc.Flush()
}

// ---- Hook delivery ----

// hookItem is one message from a subscriber, or one presence event, on its
// way to the backend.
type hookItem struct {
	target      string
	host        string // scheme://host:port of target: POSTs to one host are limited
	channel     string // the subscriber token, for X-Gockets-Channel
	id          string // unique per item: a backend can drop a retried duplicate
	contentType string
	event       string // "connect" or "disconnect" for presence events, else ""
	body        []byte
}

// what names the item for the log: "message", "connect event" or
// "disconnect event".
func (item hookItem) what() string {
	if item.event != "" {
		return item.event + " event"
	}
	return "message"
}

// forward queues a message from the subscriber for the channel's hook.
func (s *subscriber) forward(body []byte, binary bool) {
	contentType := "text/plain; charset=utf-8"
	if binary {
		contentType = "application/octet-stream"
	}
	s.push(s.ch.hookDestination(), contentType, "", body)
}

// presenceEvent is the body of a presence event.
type presenceEvent struct {
	Event     string `json:"event"`
	Channel   string `json:"channel"`
	Transport string `json:"transport"`
	Listeners int    `json:"listeners"`
	Code      int    `json:"code,omitempty"`
	Reason    string `json:"reason,omitempty"`
}

// presence tells the hook, with -hook-events, that this subscriber
// connected or disconnected. It goes through the subscriber's own queue, so
// the backend sees connect first, then the subscriber's messages, then
// disconnect.
func (s *subscriber) presence(event string, listeners int, bye *farewell, target string) {
	if !s.hub.cfg.hookEvents || target == "" {
		return
	}
	e := presenceEvent{Event: event, Channel: s.ch.subscriberToken, Transport: s.transport, Listeners: listeners}
	if bye != nil {
		e.Code, e.Reason = bye.code, bye.reason
	}
	body, err := json.Marshal(e)
	if err != nil {
		s.log().Error("encode presence event", "err", err)
		return
	}
	s.push(target, "application/json", event, body)
}

// push queues an item for the hook at target, behind the connection's
// earlier ones. What is queued is bounded per connection and for the
// whole daemon, in items and in bytes; beyond either bound the item is
// dropped, counted, and logged once until that queue drains.
func (s *subscriber) push(target, contentType, event string, body []byte) {
	if target == "" {
		s.hub.stats.hookNoHook.Add(1)
		s.log().Debug("message dropped: channel has no hook", "bytes", len(body))
		return
	}
	host := target
	if u, err := url.Parse(target); err == nil {
		host = u.Scheme + "://" + u.Host
	}
	w := &s.hub.hookWork
	w.mu.Lock()
	defer w.mu.Unlock()
	if s.hookPending == nil {
		s.hookPending = &hookQueue{log: s.log()}
	}
	q := s.hookPending
	switch {
	case len(q.items) >= hookQueueLimit || q.bytes+len(body) > hookQueueBytes && len(q.items) > 0:
		s.hub.stats.hookQueueFull.Add(1)
		if !q.dropping {
			q.log.Warn("hook queue full: dropping messages and presence events until it drains", "queued", len(q.items))
			q.dropping = true
		}
		return
	case w.items >= hookTotalLimit || w.bytes+len(body) > hookTotalBytes:
		s.hub.stats.hookTotalFull.Add(1)
		if !w.dropping {
			s.hub.log.Warn("hook queues of all subscribers full: dropping messages and presence events until they drain",
				"queued", w.items, "bytes", w.bytes, "limit", hookTotalLimit, "limit_bytes", hookTotalBytes)
			w.dropping = true
		}
		return
	}
	q.seq++
	id := fmt.Sprintf("%s.%d.%d", s.hub.bootID, s.id, q.seq)
	q.items = append(q.items, hookItem{target: target, host: host, channel: s.ch.subscriberToken, id: id,
		contentType: contentType, event: event, body: body})
	q.bytes += len(body)
	w.items++
	w.bytes += len(body)
	if !q.busy && len(q.items) == 1 {
		w.ready = append(w.ready, q)
		if w.workers < hookPosts {
			w.workers++
			w.running.Add(1)
			go s.hub.deliverHooks()
		}
	}
}

// hookWork is every subscriber's hook queue, served by at most hookPosts
// workers. A queue is either busy (a worker posts its first item), ready
// (waiting for a worker), or empty: one connection's items go one at a
// time, in order, and a busy queue's next item waits for its turn.
type hookWork struct {
	mu       sync.Mutex
	ready    []*hookQueue   // queues with items and no worker, longest waiting first
	items    int            // queued or being posted, all queues
	bytes    int            // of their bodies
	inFlight map[string]int // POSTs under way, by host
	posting  int            // POSTs under way in all
	workers  int            // running; at most hookPosts
	dropping bool           // a daemon-wide drop was logged; cleared once all drain
	running  sync.WaitGroup // the workers
}

// hookQueue is one connection's items on their way to the hook.
type hookQueue struct {
	log      *slog.Logger
	items    []hookItem
	bytes    int    // of the bodies in items
	busy     bool   // a worker is posting its first item
	dropping bool   // a drop was logged; cleared once the queue drains
	seq      uint64 // items queued, for delivery ids
}

// deliverHooks is a worker: it posts the first item of the longest
// waiting queue whose host has a POST to spare, until there is none.
func (h *hub) deliverHooks() {
	w := &h.hookWork
	defer w.running.Done()
	for {
		w.mu.Lock()
		i := slices.IndexFunc(w.ready, func(q *hookQueue) bool { return w.inFlight[q.items[0].host] < hookPostsPerHost })
		if i < 0 || h.hookCtx.Err() != nil {
			w.workers--
			w.mu.Unlock()
			return
		}
		q := w.ready[i]
		w.ready = slices.Delete(w.ready, i, i+1)
		item := q.items[0]
		q.items[0] = hookItem{}
		q.items = q.items[1:]
		q.busy = true
		w.inFlight[item.host]++
		w.posting++
		w.mu.Unlock()

		if err := h.deliver(item); err != nil {
			h.stats.hookFailed.Add(1)
			q.log.Warn("hook delivery failed: "+item.what()+" dropped", "delivery_id", item.id, "err", err)
		} else {
			h.stats.hookDelivered.Add(1)
		}

		w.mu.Lock()
		q.bytes -= len(item.body)
		q.busy = false
		if len(q.items) > 0 {
			w.ready = append(w.ready, q)
		} else {
			q.items, q.dropping = nil, false
		}
		if w.inFlight[item.host]--; w.inFlight[item.host] == 0 {
			delete(w.inFlight, item.host)
		}
		w.posting--
		w.items--
		w.bytes -= len(item.body)
		if w.items == 0 {
			w.dropping = false
		}
		w.mu.Unlock()
	}
}

// pendingHooks is how many items wait for a hook or are being posted.
func (h *hub) pendingHooks() int {
	h.hookWork.mu.Lock()
	defer h.hookWork.mu.Unlock()
	return h.hookWork.items
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
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-h.hookCtx.Done():
			t.Stop()
			return fmt.Errorf("shutting down after attempt %d: %w", attempt, err)
		}
		h.stats.hookRetried.Add(1)
		backoff = min(2*backoff, policy.backoffMax)
	}
}

// post makes one attempt; retry says whether another one may succeed.
func (h *hub) post(item hookItem) (retry bool, err error) {
	req, err := http.NewRequestWithContext(h.hookCtx, http.MethodPost, item.target, bytes.NewReader(item.body))
	if err != nil {
		return false, fmt.Errorf("build request: %w", err)
	}
	req.Header.Set("Content-Type", item.contentType)
	if item.event != "" {
		req.Header.Set("X-Gockets-Event", item.event)
	}
	req.Header.Set("User-Agent", "Gockets/"+version)
	req.Header.Set("X-Gockets-Channel", item.channel)
	req.Header.Set("X-Gockets-Delivery-Id", item.id)
	if h.cfg.hookSecret != "" {
		timestamp := strconv.FormatInt(time.Now().Unix(), 10)
		req.Header.Set("X-Gockets-Timestamp", timestamp)
		req.Header.Set("X-Gockets-Signature", "sha256="+sign(h.cfg.hookSecret, timestamp, item))
	}
	resp, err := h.hooks.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // without the URL, whose query may hold a secret
		}
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

// sign is the hex HMAC-SHA256, under secret, of every header the backend
// acts on and the body, each header value on a line of its own:
// "TIMESTAMP\nCHANNEL\nEVENT\nDELIVERY_ID\nCONTENT_TYPE\nBODY". The
// timestamp lets a backend refuse replays; the channel keeps a body from
// being replayed as another channel's; the event, delivery id and content
// type keep a message from being replayed as a presence event, as a new
// delivery or as binary. A header value cannot hold a newline, so no part
// can be shifted into another.
func sign(secret, timestamp string, item hookItem) string {
	mac := hmac.New(sha256.New, []byte(secret))
	for _, part := range []string{timestamp, item.channel, item.event, item.id, item.contentType} {
		mac.Write([]byte(part + "\n"))
	}
	mac.Write(item.body)
	return hex.EncodeToString(mac.Sum(nil))
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
	// For operators.
	mux.HandleFunc("GET /metrics", h.admin(h.handleMetrics))
	mux.HandleFunc("GET /healthz", h.handleHealth)
	return mux
}

// ServeHTTP routes a request; what no route takes gets a JSON 404 or 405.
func (h *hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if c, ok := r.Context().Value(connKey{}).(*connActivity); ok {
		c.serve(r)
		defer c.handling.Store(false)
	}
	// prepare is a literal under the /channel/{publisher_token} wildcard:
	// "GET /channel/prepare" is a wrong method, not a token.
	if r.URL.Path == "/channel/prepare" && r.Method != http.MethodPost {
		prepareNeedsPost(w, r)
		return
	}
	h.mux.ServeHTTP(&routeErrors{ResponseWriter: w, r: r}, r)
}

// prepareNeedsPost answers a GET (or other) of /channel/prepare. It is
// apart from ServeHTTP, whose frame every upgrade's stack holds.
func prepareNeedsPost(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Allow", http.MethodPost)
	reply(w, http.StatusMethodNotAllowed, "ERR", "method "+r.Method+" is not allowed here; allowed: POST")
}

// routeErrors passes every reply through but the mux's own plain-text 404
// and 405, which it answers in JSON (405 keeps the mux's Allow header), and
// its HTML redirect from a path such as //channel or /channel/./x to the
// cleaned path, which it answers with a JSON 404 naming that path: the
// API's paths are exact, and an API client follows no redirect (a
// WebSocket cannot). It spares routing each request twice to find those
// out beforehand.
type routeErrors struct {
	http.ResponseWriter
	r        *http.Request
	replaced bool
}

func (e *routeErrors) WriteHeader(code int) {
	mine := code == http.StatusNotFound || code == http.StatusMethodNotAllowed || code == http.StatusTemporaryRedirect
	if !mine || e.Header().Get("Content-Type") == "application/json" {
		e.ResponseWriter.WriteHeader(code)
		return
	}
	e.replaced = true
	header := e.Header()
	header.Del("X-Content-Type-Options")
	switch code {
	case http.StatusMethodNotAllowed:
		reply(e.ResponseWriter, code, "ERR", "method "+e.r.Method+" is not allowed here; allowed: "+header.Get("Allow"))
	case http.StatusTemporaryRedirect:
		cleaned := header.Get("Location")
		header.Del("Location")
		reply(e.ResponseWriter, http.StatusNotFound, "ERR", "no such route: "+e.r.Method+" "+e.r.URL.Path+" (paths are exact: did you mean "+cleaned+"?)")
	default:
		reply(e.ResponseWriter, code, "ERR", "no such route: "+e.r.Method+" "+e.r.URL.Path)
	}
}

func (e *routeErrors) Write(p []byte) (int, error) {
	if e.replaced {
		return len(p), nil
	}
	return e.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the connection: to flush an
// event stream, and to hijack for takeover without a call of its own (the
// upgrade's deepest call then fits the handler's 4 KiB stack).
func (e *routeErrors) Unwrap() http.ResponseWriter { return e.ResponseWriter }

// admin guards a route. The Host lock is the original's and stays, but a
// client picks its own Host header: the locks that hold are the address
// allow-list and the bearer token.
func (h *hub) admin(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		switch {
		case !hostMatches(r.Host, h.cfg.hostName):
			reply(w, http.StatusForbidden, "ERR", "admin routes answer only to host "+h.cfg.hostName)
		case len(h.cfg.adminAllow) > 0 && !h.cfg.adminAllow.contain(h.clientAddr(r)):
			reply(w, http.StatusForbidden, "ERR", "admin routes are not open to your address")
		case h.cfg.adminToken != "" && !h.authorized(r):
			w.Header().Set("WWW-Authenticate", `Bearer realm="gockets"`)
			reply(w, http.StatusUnauthorized, "ERR", "admin routes need the header Authorization: Bearer <admin token>")
		default:
			next(w, r)
		}
	}
}

// authorized compares the bearer token with -admin-token in constant time;
// hashing both first hides the token's length too.
func (h *hub) authorized(r *http.Request) bool {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return false
	}
	got, want := sha256.Sum256([]byte(strings.TrimSpace(token))), sha256.Sum256([]byte(h.cfg.adminToken))
	return subtle.ConstantTimeCompare(got[:], want[:]) == 1
}

// clientAddr is the TCP peer, or, when the peer is a -trust-proxy, the
// address it names in X-Forwarded-For: the rightmost that is not itself a
// trusted proxy. A header a client wrote counts only behind such a proxy.
func (h *hub) clientAddr(r *http.Request) netip.Addr {
	peer, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	addr := peer.Addr().Unmap()
	forwarded := r.Header.Values("X-Forwarded-For")
	if !h.cfg.trustProxy.contain(addr) || len(forwarded) == 0 {
		return addr
	}
	hops := strings.Split(strings.Join(forwarded, ","), ",")
	for i := len(hops) - 1; i >= 0; i-- {
		hop, err := netip.ParseAddr(strings.TrimSpace(hops[i]))
		if err != nil {
			return netip.Addr{} // a garbled header: trust none of it
		}
		if addr = hop.Unmap(); !h.cfg.trustProxy.contain(addr) {
			break
		}
	}
	return addr
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
	writeJSON(w, status, replyBody{typ, msg})
}

// replyBody is every reply that is not a channel.
type replyBody struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

// writeJSON writes every JSON answer of the daemon.
func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		body = []byte(`{"type":"ERR","message":"cannot encode the reply"}`)
	}
	writeBody(w, status, append(body, '\n'))
}

func writeBody(w http.ResponseWriter, status int, body []byte) {
	header := w.Header()
	header["Content-Type"] = []string{"application/json"}
	header["Content-Length"] = []string{strconv.Itoa(len(body))}
	w.WriteHeader(status)
	_, _ = w.Write(body) // the client is gone if this fails; nothing to do
}

// readBody reads a request body of at most limit bytes, answering 413 or 400
// itself when it cannot.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, bool) {
	return readBodyAfter(w, r, limit, 0)
}

// readBodyAfter is readBody with headroom bytes left free before the body.
func readBodyAfter(w http.ResponseWriter, r *http.Request, limit int64, headroom int) ([]byte, bool) {
	tooBig := func() ([]byte, bool) {
		reply(w, http.StatusRequestEntityTooLarge, "ERR", fmt.Sprintf("body is larger than %d bytes", limit))
		return nil, false
	}
	if r.ContentLength > limit {
		return tooBig()
	}
	if r.ContentLength >= 0 {
		// The length is known and allowed (net/http reads no byte past
		// it): one buffer of exactly that size, read in place.
		buf := make([]byte, headroom+int(r.ContentLength))
		if _, err := io.ReadFull(r.Body, buf[headroom:]); err != nil {
			reply(w, http.StatusBadRequest, "ERR", "cannot read body: "+err.Error())
			return nil, false
		}
		return buf, true
	}
	var buf bytes.Buffer // of unknown length (chunked): it grows as it comes
	buf.Write(make([]byte, headroom))
	_, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, limit))
	var maxBytes *http.MaxBytesError
	switch {
	case errors.As(err, &maxBytes):
		return tooBig()
	case err != nil:
		reply(w, http.StatusBadRequest, "ERR", "cannot read body: "+err.Error())
		return nil, false
	}
	return buf.Bytes(), true
}

// failed answers an engine's error, if any: 404 for an unknown token, 503
// for a change that could not be saved or could not reach Redis.
func failed(w http.ResponseWriter, err error, what string) bool {
	if err == nil {
		return false
	}
	status, msg := answerTo(err, what)
	reply(w, status, "ERR", msg)
	return true
}

// answerTo is the status and message that answer an engine's error. An
// error of a Redis script ends with the script's SHA and line: for the
// log, not for the client.
func answerTo(err error, what string) (int, string) {
	if errors.Is(err, errNotFound) {
		return http.StatusNotFound, what + " token not found"
	}
	msg, _, _ := strings.Cut(err.Error(), " script: ")
	return http.StatusServiceUnavailable, msg
}

func (h *hub) handlePrepare(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r, h.cfg.maxRequestBytes)
	if !ok {
		return
	}
	opts, err := parseChannelOptions(body)
	if err != nil {
		reply(w, http.StatusBadRequest, "ERR", err.Error())
		return
	}
	view, err := h.engine.prepare(r.Context(), opts)
	if failed(w, err, "publisher") {
		return
	}
	h.log.Info("channel prepared", "channel", fingerprint(view.SubscriberToken))
	writeJSON(w, http.StatusOK, view)
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
	list, err := h.engine.list(r.Context(), match)
	if failed(w, err, "publisher") {
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Channels []channelJSON `json:"channels"`
	}{list})
}

func (h *hub) handleShow(w http.ResponseWriter, r *http.Request) {
	view, err := h.engine.show(r.Context(), r.PathValue("publisher_token"))
	if failed(w, err, "publisher") {
		return
	}
	writeJSON(w, http.StatusOK, view)
}

func (h *hub) handleEdit(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r, h.cfg.maxRequestBytes)
	if !ok {
		return
	}
	opts, err := parseChannelOptions(body)
	if err != nil {
		reply(w, http.StatusBadRequest, "ERR", err.Error())
		return
	}
	view, err := h.engine.edit(r.Context(), r.PathValue("publisher_token"), opts)
	if failed(w, err, "publisher") {
		return
	}
	writeJSON(w, http.StatusOK, view)
}

func (h *hub) handlePublish(w http.ResponseWriter, r *http.Request) {
	buf, ok := readBodyAfter(w, r, h.cfg.maxMessageBytes, frameHeadroom)
	if !ok {
		return
	}
	mediaType, _, _ := strings.Cut(r.Header.Get("Content-Type"), ";")
	isBinary := strings.EqualFold(strings.TrimSpace(mediaType), "application/octet-stream")
	if !isBinary && !utf8.Valid(buf[frameHeadroom:]) {
		// A browser drops a WebSocket that sends it text that is not UTF-8.
		reply(w, http.StatusBadRequest, "ERR", "body is not UTF-8 text: publish binary data with Content-Type: application/octet-stream")
		return
	}
	n, queued, err := h.engine.publish(r.Context(), r.PathValue("publisher_token"), newMessage(buf, isBinary, time.Now()))
	if failed(w, err, "publisher") {
		return
	}
	out := h.batches.Get().(*[]byte)
	*out = publishReply((*out)[:0], n, queued)
	writeBody(w, http.StatusOK, *out)
	*out = (*out)[:0] // as frameBatch takes it: empty
	h.batches.Put(out)
}

// publishReply says how many subscribers took the message, or whether it
// was kept for the next one: {"type":"INF","message":…,"subscribers":N,
// "queued":false}, appended to b. Built by hand, as publish is the hot
// path.
func publishReply(b []byte, subscribers int, queued bool) []byte {
	b = append(b, `{"type":"INF","message":"`...)
	switch {
	case queued:
		b = append(b, "no subscriber is connected: message kept for the next one"...)
	case subscribers == 0:
		b = append(b, "no subscriber is connected: message dropped (-backlog 0)"...)
	default:
		b = strconv.AppendInt(append(b, "message handed to "...), int64(subscribers), 10)
		b = append(b, " subscriber(s)"...)
	}
	b = strconv.AppendInt(append(b, `","subscribers":`...), int64(subscribers), 10)
	b = strconv.AppendBool(append(b, `,"queued":`...), queued)
	return append(b, "}\n"...)
}

func (h *hub) handleDelete(w http.ResponseWriter, r *http.Request) {
	subscriberToken, err := h.engine.remove(r.Context(), r.PathValue("publisher_token"))
	if failed(w, err, "publisher") {
		return
	}
	h.log.Info("channel deleted", "channel", fingerprint(subscriberToken))
	reply(w, http.StatusOK, "OK", "channel closed and deleted")
}

// handleSubscribe connects a subscriber: a WebSocket upgrade, or an SSE
// stream for "Accept: text/event-stream". Unknown tokens, origins outside
// -allowed-origins and subscribers beyond the limits are refused before
// any upgrade.
func (h *hub) handleSubscribe(w http.ResponseWriter, r *http.Request) {
	// The checks answer apart: this frame is on the stack of every upgrade.
	ch, upgrade := h.checkSubscriber(w, r)
	switch {
	case ch == nil: // answered
	case upgrade:
		h.subscribeWebSocket(w, r, ch)
	default:
		h.subscribeSSE(w, r, ch)
	}
}

// checkSubscriber admits a subscriber and returns its channel, and whether
// it asks for a WebSocket rather than an event stream; or answers it and
// returns nil.
func (h *hub) checkSubscriber(w http.ResponseWriter, r *http.Request) (ch *channel, upgrade bool) {
	origin := r.Header.Get("Origin")
	if !h.cfg.allowedOrigins.allow(origin) {
		if ok, suppressed := h.refusedOrigins.allow(time.Now(), refusalLogEvery); ok {
			h.log.Warn("subscriber refused: origin not in -allowed-origins", "origin", origin, "refused_since_last_line", suppressed)
		}
		reply(w, http.StatusForbidden, "ERR", "origin "+origin+" may not subscribe (see -allowed-origins)")
		return nil, false
	}
	ch, err := h.engine.find(r.Context(), r.PathValue("subscriber_token"))
	if failed(w, err, "subscriber") {
		return nil, false
	}
	if h.closing.Load() {
		reply(w, http.StatusServiceUnavailable, "ERR", "shutting down")
		return nil, false
	}
	upgrade = strings.EqualFold(r.Header.Get("Upgrade"), "websocket")
	stream := strings.Contains(r.Header.Get("Accept"), "text/event-stream")
	switch {
	case !upgrade && !stream:
		reply(w, http.StatusBadRequest, "ERR", "expected a WebSocket upgrade, or Accept: text/event-stream")
		return nil, false
	case upgrade && r.ProtoMajor != 1:
		reply(w, http.StatusHTTPVersionNotSupported, "ERR", "WebSocket needs HTTP/1.1")
		return nil, false
	case !upgrade && r.Method == http.MethodHead:
		// A HEAD can receive no message: it gets the stream's headers,
		// and neither takes the backlog nor counts as a listener.
		setSSEHeaders(w, r)
		w.WriteHeader(http.StatusOK)
		return nil, false
	}
	if refusal := h.admit(ch); refusal != "" {
		w.Header().Set("Connection", "close") // its file descriptor is what we lack
		reply(w, http.StatusServiceUnavailable, "ERR", refusal)
		return nil, false
	}
	return ch, upgrade
}

// admit counts a subscriber connection against -max-subscribers and
// -max-subscribers-per-channel, or says why it may not connect. Each
// admitted connection is released once closed.
func (h *hub) admit(ch *channel) (refusal string) {
	if h.connected.Add(1) > int64(h.cfg.maxSubscribers) {
		h.connected.Add(-1)
		h.stats.refusedDaemonFull.Add(1)
		return fmt.Sprintf("too many subscribers: the daemon has its most, %d (-max-subscribers)", h.cfg.maxSubscribers)
	}
	ch.mu.Lock()
	full := ch.connected >= h.cfg.maxSubscribersPerChannel
	if !full {
		ch.connected++
	}
	ch.mu.Unlock()
	if full {
		h.connected.Add(-1)
		h.stats.refusedChannelFull.Add(1)
		return fmt.Sprintf("too many subscribers: this channel has its most, %d (-max-subscribers-per-channel)", h.cfg.maxSubscribersPerChannel)
	}
	h.connections.Add(1)
	return ""
}

// release ends what admit counted, once the connection is closed.
func (h *hub) release(ch *channel) {
	ch.mu.Lock()
	ch.connected--
	ch.mu.Unlock()
	h.connected.Add(-1)
	h.connections.Done()
}

// subscribeWebSocket upgrades.
func (h *hub) subscribeWebSocket(w http.ResponseWriter, r *http.Request, ch *channel) {
	// Admitted before the hijack, while Shutdown still waits for this
	// request; released by the subscriber's reader, or here if it never runs.
	s := h.newSubscriber(ch, "websocket")
	u := &upgrade{ResponseWriter: w, h: h, ch: ch, s: s, conn: &keptConn{},
		req: http.Request{Method: r.Method, URL: r.URL, Header: r.Header, Host: r.Host, TLS: r.TLS}}
	u.out = &frameBatch{fd: -1, pool: &h.batches, arm: func() error { return s.armWrite(writeWait) }, disarm: s.disarmWrite}
	defer u.end() // deferred: x/net panics when the hijack fails
	websocket.Server{Handshake: u.handshake, Handler: u.serve}.ServeHTTP(u, &u.req)
}

// upgrade is one WebSocket upgrade, and the ResponseWriter x/net/websocket
// hijacks. It hands x/net small buffers instead of net/http's (whose
// reader it keeps only when that holds bytes already read), a writer that
// flushes into the subscriber's frameBatch, and the connection as a
// keptConn, so that nothing holds net/http's connection and buffers once
// the handler returns. Its handshake, unlike websocket.Handler's, accepts
// clients without an Origin header (PHP, node, curl).
type upgrade struct {
	http.ResponseWriter
	h      *hub
	ch     *channel
	s      *subscriber
	conn   *keptConn
	out    *frameBatch
	joined bool
	req    http.Request // what x/net reads the handshake from, and keeps
}

func (u *upgrade) handshake(cfg *websocket.Config, req *http.Request) error {
	// Read by now, and x/net keeps them: req (whose method is a piece of
	// the request line, the line then kept whole) and its parse of the URL.
	*req, cfg.Location = http.Request{}, nil
	// x/net refuses a client that offers more than one subprotocol;
	// take its first, as a server that knows none may. x/net keeps
	// the empty names of "a, ,b": they are no choice.
	cfg.Protocol = slices.DeleteFunc(cfg.Protocol, func(p string) bool { return p == "" })
	cfg.Protocol = cfg.Protocol[:min(len(cfg.Protocol), 1)]
	// Joining before the 101 is sent makes listeners count a
	// subscriber by the time it can see the upgrade. Between the
	// lookup and here the channel may have gone, or Redis failed.
	if err := u.h.engine.join(u.ch, u.s, false, 0); err != nil {
		u.refuse(err)
		return err
	}
	u.joined = true
	return nil
}

// refuse answers a join that failed as the handlers answer its error
// (failed), on the connection x/net has taken, and drops the bare 403 that
// x/net writes after it.
func (u *upgrade) refuse(err error) {
	status, msg := answerTo(err, "subscriber")
	body, _ := json.Marshal(replyBody{"ERR", msg})
	head := fmt.Sprintf("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n",
		status, http.StatusText(status), len(body)+1)
	conn := u.out.conn
	if conn.SetWriteDeadline(time.Now().Add(writeWait)) == nil {
		_, _ = conn.Write(append(append([]byte(head), body...), '\n')) // the client is gone if this fails
	}
	u.out.conn = answered{conn}
}

// answered is a connection whose answer is written: what else x/net
// writes to it is dropped.
type answered struct{ net.Conn }

func (answered) Write(p []byte) (int, error) { return len(p), nil }

// end undoes what an upgrade that did not keep the connection took, however
// it ended (net/http recovers x/net's panic): the join, then the admission.
func (u *upgrade) end() {
	if u.conn.kept {
		return
	}
	if u.joined { // the upgrade failed after the join
		u.h.engine.unjoin(u.ch, u.s)
	}
	u.h.release(u.ch)
}

func (u *upgrade) serve(ws *websocket.Conn) {
	u.conn.kept = true
	u.s.serveWebSocket(ws, u.conn, u.out)
}

// Hijack is the upgrade's deepest call: net/http's handler goroutine runs
// it on a 4 KiB stack that must grow (a copy of it) when the call needs
// more, so it hands what follows the hijack to take.
func (u *upgrade) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, buf, err := http.NewResponseController(u.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	return u.take(conn, buf)
}

func (u *upgrade) take(conn net.Conn, buf *bufio.ReadWriter) (_ net.Conn, _ *bufio.ReadWriter, err error) {
	u.ResponseWriter = nil // net/http's, which x/net's req would keep (u.req)
	u.conn.Conn, u.out.conn = conn, conn
	if tcp, ok := conn.(*net.TCPConn); ok {
		raw, err := tcp.SyscallConn()
		if err == nil {
			err = raw.Control(func(fd uintptr) { u.out.fd = int(fd) })
		}
		if err != nil {
			conn.Close()
			return nil, nil, fmt.Errorf("raw connection: %w", err)
		}
	}
	u.conn.in = buf.Reader
	if u.conn.in.Buffered() == 0 {
		u.conn.in = bufio.NewReaderSize(conn, wsBufferSize)
	}
	return u.conn, bufio.NewReadWriter(u.conn.in, bufio.NewWriterSize(u.out, wsBufferSize)), nil
}

// keptConn is the connection as x/net/websocket sees it. x/net closes it
// when its Handler returns; once the subscriber has taken it over, that
// Close is ignored, and the subscriber's reader closes it at the end.
type keptConn struct {
	net.Conn
	in   *bufio.Reader // what x/net was given to read; the subscriber reads frames from it
	kept bool          // set by Handler, read by x/net's Close, on the same goroutine
}

func (c *keptConn) Close() error {
	if c.kept {
		return nil
	}
	return c.Conn.Close()
}

// subscribeSSE streams Server-Sent Events until the client goes, the
// channel is deleted or we shut down.
func (h *hub) subscribeSSE(w http.ResponseWriter, r *http.Request, ch *channel) {
	defer h.release(ch) // admitted by handleSubscribe
	rc := http.NewResponseController(w)
	// The stream outlives -read-timeout; the writer sets write deadlines.
	if err := rc.SetReadDeadline(time.Time{}); err != nil {
		reply(w, http.StatusInternalServerError, "ERR", "cannot stream: "+err.Error())
		return
	}
	lastID, err := strconv.ParseUint(r.Header.Get("Last-Event-ID"), 10, 64)
	resume := err == nil
	s := h.newSubscriber(ch, "sse")
	if err := h.engine.join(ch, s, resume, lastID); err != nil {
		failed(w, err, "subscriber")
		return
	}
	// A WebSocket's reader sees its client go; an event stream learns it
	// from the request's context.
	defer context.AfterFunc(r.Context(), func() {
		s.stop(farewell{closeGoingAway, "connection lost", false})
	})()
	setSSEHeaders(w, r)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		s.stop(farewell{closeGoingAway, "connection lost", false})
	}
	s.serveSSE(&ssePeer{w: w, rc: rc})
}

func setSSEHeaders(w http.ResponseWriter, r *http.Request) {
	header := w.Header()
	header.Set("Content-Type", "text/event-stream")
	header.Set("Cache-Control", "no-cache")
	header.Set("X-Accel-Buffering", "no") // nginx: pass events on at once
	if origin := r.Header.Get("Origin"); origin != "" {
		header.Set("Access-Control-Allow-Origin", origin) // allowed by handleSubscribe
		header.Set("Vary", "Origin")
	}
}

// handleHealth is for load balancers and systemd: 200 while serving, 503
// once shutdown has begun or while Redis cannot be reached. It is open to
// all.
func (h *hub) handleHealth(w http.ResponseWriter, _ *http.Request) {
	if h.closing.Load() {
		reply(w, http.StatusServiceUnavailable, "ERR", "shutting down")
		return
	}
	if err := h.engine.health(); err != nil {
		reply(w, http.StatusServiceUnavailable, "ERR", err.Error())
		return
	}
	reply(w, http.StatusOK, "OK", "serving")
}

// handleMetrics answers in the Prometheus text exposition format.
func (h *hub) handleMetrics(w http.ResponseWriter, _ *http.Request) {
	channels := h.all()
	bySubscriber := map[string]int64{"websocket": 0, "sse": 0}
	for _, ch := range channels {
		ch.mu.Lock()
		for _, s := range ch.subscribers {
			bySubscriber[s.transport]++
		}
		ch.mu.Unlock()
	}
	var mem runtime.MemStats
	runtime.ReadMemStats(&mem)
	h.hookWork.mu.Lock()
	hooks := struct{ items, bytes, posting int }{h.hookWork.items, h.hookWork.bytes, h.hookWork.posting}
	h.hookWork.mu.Unlock()
	st := &h.stats
	var b bytes.Buffer
	for _, f := range []struct {
		name, kind, help string
		samples          []metricSample
	}{
		{"gockets_build_info", "gauge", "The version of this daemon.", []metricSample{{`version="` + version + `"`, 1}}},
		{"gockets_channels", "gauge", "Channels that exist now.", []metricSample{{"", int64(len(channels))}}},
		{"gockets_subscribers", "gauge", "Subscribers connected now, by transport.", []metricSample{
			{`transport="sse"`, bySubscriber["sse"]}, {`transport="websocket"`, bySubscriber["websocket"]}}},
		{"gockets_messages_published_total", "counter", "Messages published.", []metricSample{{"", st.published.Load()}}},
		{"gockets_messages_delivered_total", "counter", "Messages written to subscribers, one per subscriber.", []metricSample{{"", st.delivered.Load()}}},
		{"gockets_messages_queued_total", "counter", "Messages kept for the next subscriber because none was connected.", []metricSample{{"", st.queued.Load()}}},
		{"gockets_messages_dropped_total", "counter", "Messages that reached no subscriber, by reason.", []metricSample{
			{`reason="backlog_expired"`, st.droppedExpired.Load()}, {`reason="backlog_full"`, st.droppedBacklogFull.Load()},
			{`reason="no_subscriber"`, st.droppedNoSubscriber.Load()}, {`reason="slow_subscriber"`, st.droppedSlow.Load()},
			{`reason="subscriber_gone"`, st.droppedGone.Load()}}},
		{"gockets_subscribers_limit", "gauge", "The most subscriber connections allowed, in all and per channel (-max-subscribers, -max-subscribers-per-channel).", []metricSample{
			{`per="channel"`, int64(h.cfg.maxSubscribersPerChannel)}, {`per="daemon"`, int64(h.cfg.maxSubscribers)}}},
		{"gockets_subscribers_refused_total", "counter", "Subscribers refused with 503 because a limit was reached.", []metricSample{
			{`reason="channel_full"`, st.refusedChannelFull.Load()}, {`reason="daemon_full"`, st.refusedDaemonFull.Load()}}},
		{"gockets_slow_subscriber_disconnects_total", "counter", "Subscribers closed because their send queue was full.", []metricSample{{"", st.slowDisconnects.Load()}}},
		{"gockets_hook_requests_total", "counter", "POSTs to hooks, by result: ok (2xx) or error (no answer, timeout, other status).", []metricSample{
			{`result="error"`, st.hookRetried.Load() + st.hookFailed.Load()}, {`result="ok"`, st.hookDelivered.Load()}}},
		{"gockets_hook_dropped_total", "counter", "Subscriber messages and events that never reached a hook, by reason.", []metricSample{
			{`reason="attempts_spent"`, st.hookFailed.Load()}, {`reason="no_hook"`, st.hookNoHook.Load()},
			{`reason="queue_full"`, st.hookQueueFull.Load()}, {`reason="total_queue_full"`, st.hookTotalFull.Load()}}},
		{"gockets_hook_queued", "gauge", "Subscriber messages and events waiting for a hook or being posted, all subscribers together.", []metricSample{{"", int64(hooks.items)}}},
		{"gockets_hook_queued_bytes", "gauge", "Bytes of their bodies.", []metricSample{{"", int64(hooks.bytes)}}},
		{"gockets_hook_queue_limit", "gauge", "The most that may be queued, all subscribers together; one subscriber's queue holds at most 256 and 4 MiB.", []metricSample{{"", hookTotalLimit}}},
		{"gockets_hook_queue_limit_bytes", "gauge", "The most bytes that may be queued, all subscribers together.", []metricSample{{"", hookTotalBytes}}},
		{"gockets_hook_posts_in_flight", "gauge", "POSTs to hooks under way now.", []metricSample{{"", int64(hooks.posting)}}},
		{"gockets_hook_posts_limit", "gauge", "The most POSTs to hooks under way at once, in all and to one host.", []metricSample{
			{`per="daemon"`, hookPosts}, {`per="host"`, hookPostsPerHost}}},
		{"gockets_state_save_failures_total", "counter", "Failed writes of the state file or its journal.", []metricSample{{"", st.stateSaveFailure.Load()}}},
		{"go_goroutines", "gauge", "Goroutines that exist now.", []metricSample{{"", int64(runtime.NumGoroutine())}}},
		{"go_memstats_heap_alloc_bytes", "gauge", "Bytes of heap objects in use or not yet freed.", []metricSample{{"", int64(mem.HeapAlloc)}}},
	} {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", f.name, f.help, f.name, f.kind)
		for _, s := range f.samples {
			if s.labels != "" {
				fmt.Fprintf(&b, "%s{%s} %d\n", f.name, s.labels, s.value)
			} else {
				fmt.Fprintf(&b, "%s %d\n", f.name, s.value)
			}
		}
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	_, _ = w.Write(b.Bytes()) // the scraper is gone if this fails
}

type metricSample struct {
	labels string
	value  int64
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
	cfg, err := parseConfig(args, getenv, stdout)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	log := newLogger(stderr, cfg.logLevel)
	h, err := newHub(cfg, log)
	if err != nil {
		return err
	}
	srv := newServer(cfg, h, log)
	ln, err := listen(cfg, srv)
	if err != nil {
		h.discard()
		return err
	}
	h.start()
	if adminOpen(cfg, ln.Addr()) {
		log.Warn("the admin API is open to anyone who can reach this port: set -admin-token or -admin-allow, or -bind 127.0.0.1", "addr", ln.Addr().String())
	}
	log.Info("gockets listening", "addr", ln.Addr().String(), "tls", cfg.tlsCert != "", "host_name", cfg.hostName, "ping_interval", cfg.pingInterval)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	select {
	case err := <-served:
		h.stop()
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down")
	return shutdown(srv, h)
}

// adminOpen says whether the admin API answers anyone who can reach addr:
// beyond loopback, with neither -admin-token nor -admin-allow.
func adminOpen(cfg config, addr net.Addr) bool {
	tcp, ok := addr.(*net.TCPAddr)
	return ok && !tcp.IP.IsLoopback() && cfg.adminToken == "" && len(cfg.adminAllow) == 0
}

// listen opens -bind:-port, with TLS when -tls-cert is set.
func listen(cfg config, srv *http.Server) (net.Listener, error) {
	var cert tls.Certificate
	if cfg.tlsCert != "" {
		var err error
		if cert, err = tls.LoadX509KeyPair(cfg.tlsCert, cfg.tlsKey); err != nil {
			return nil, fmt.Errorf("load TLS certificate: %w", err)
		}
	}
	// No TCP keepalive: WebSocket subscribers are pinged and SSE streams
	// send heartbeats, which find a vanished peer sooner, and admin
	// connections end after -idle-timeout. It would cost four system calls
	// per connection and find nothing.
	// The send buffer is capped on the listener: accepted connections
	// inherit it, with no system call of their own.
	lc := net.ListenConfig{KeepAlive: -1, Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) {
			err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, sendBufferBytes)
		}); cerr != nil {
			return cerr
		}
		if err != nil {
			return fmt.Errorf("set send buffer: %w", err)
		}
		return nil
	}}
	ln, err := lc.Listen(context.Background(), "tcp", net.JoinHostPort(cfg.bind, strconv.Itoa(cfg.port)))
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	if cfg.tlsCert == "" {
		return ln, nil
	}
	// HTTP/1.1 only: a WebSocket upgrade hijacks the connection, which an
	// HTTP/2 stream cannot be.
	srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}
	return tls.NewListener(ln, srv.TLSConfig), nil
}

// newServer is the HTTP server with the limits of cfg. The timeouts guard
// admin requests; WebSockets set their own deadlines once upgraded.
func newServer(cfg config, h *hub, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ConnState:         h.requests.connState,
		ReadHeaderTimeout: cfg.readHeaderTimeout,
		ReadTimeout:       cfg.readTimeout,
		WriteTimeout:      cfg.writeTimeout,
		IdleTimeout:       cfg.idleTimeout,
		MaxHeaderBytes:    cfg.maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn), // "too many open files" matters
		ConnContext:       h.requests.connContext,
	}
}

// shutdown closes every subscriber with 1001, lets in-flight requests and
// queued hook deliveries finish within shutdownTimeout, and writes the
// state file. What it abandons then fails it, except requests that had not
// even been received whole: a client trickling a body loses nothing it was
// promised, and is named in a warning.
func shutdown(srv *http.Server, h *hub) error {
	ctx, cancel := context.WithTimeout(context.Background(), h.cfg.shutdown)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- srv.Shutdown(ctx) }() // closes the listeners at once
	h.closeAll()                                // SSE streams end, so Shutdown can finish
	var errs []error
	if err := <-served; err != nil {
		received, partial := h.requests.unfinished()
		for _, r := range partial {
			h.log.Warn("shutdown: abandoned a request not received whole", "request", r)
		}
		if len(received) > 0 {
			errs = append(errs, fmt.Errorf("abandoned %d request(s) still being handled: %s", len(received), strings.Join(received, ", ")))
		}
		if err := srv.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close connections: %w", err))
		}
	}
	errs = append(errs, h.wait(ctx))
	h.stop()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	h.log.Info("stopped")
	return nil
}

// requestWatch knows what each HTTP connection is doing, so that a
// shutdown that runs out of time can say what it abandons.
type requestWatch struct {
	mu    sync.Mutex
	conns map[net.Conn]*connActivity
}

// connActivity is one HTTP connection: its request under way, if any.
type connActivity struct {
	active   atomic.Bool                  // between a request's headers and the end of its reply
	request  atomic.Pointer[http.Request] // the last one
	handling atomic.Bool                  // a handler is running for it
	body     atomic.Pointer[watchedBody]  // its body, nil when it has none
}

type connKey struct{}

// connContext and connState are the server's hooks.
func (rw *requestWatch) connContext(ctx context.Context, conn net.Conn) context.Context {
	c := &connActivity{}
	rw.mu.Lock()
	if rw.conns == nil {
		rw.conns = make(map[net.Conn]*connActivity)
	}
	rw.conns[conn] = c
	rw.mu.Unlock()
	return context.WithValue(ctx, connKey{}, c)
}

func (rw *requestWatch) connState(conn net.Conn, state http.ConnState) {
	switch state {
	case http.StateActive, http.StateIdle:
		rw.mu.Lock()
		c := rw.conns[conn]
		rw.mu.Unlock()
		if c != nil {
			c.active.Store(state == http.StateActive)
		}
	case http.StateHijacked, http.StateClosed: // a subscriber's, or gone
		rw.mu.Lock()
		delete(rw.conns, conn)
		rw.mu.Unlock()
	}
}

// serve records a request whose handler starts; the caller clears
// handling when it ends.
func (c *connActivity) serve(r *http.Request) {
	c.request.Store(r)
	c.body.Store(nil)
	if r.Body != nil && r.Body != http.NoBody {
		b := &watchedBody{ReadCloser: r.Body}
		c.body.Store(b)
		r.Body = b
	}
	c.handling.Store(true)
}

// watchedBody is a request body that knows whether it was read to the end.
type watchedBody struct {
	io.ReadCloser
	whole atomic.Bool
}

func (b *watchedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.whole.Store(true)
	}
	return n, err
}

// unfinished describes the requests of the connections still active: those
// received whole whose handler still runs, and those whose body (or reply)
// was still on its way. Tokens in paths appear as fingerprints.
func (rw *requestWatch) unfinished() (received, partial []string) {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	for _, c := range rw.conns {
		r := c.request.Load()
		if !c.active.Load() || r == nil || strings.HasPrefix(r.URL.Path, "/channel/subscribe/") {
			continue // an event stream is a subscriber: wait counts those
		}
		path := r.URL.Path
		if i := strings.LastIndexByte(path, '/'); len(path)-i-1 > 16 {
			path = path[:i+1] + "#" + fingerprint(path[i+1:])
		}
		desc := r.Method + " " + path + " from " + r.RemoteAddr
		body := c.body.Load()
		switch {
		case body != nil && !body.whole.Load():
			partial = append(partial, desc+": body not received whole")
		case c.handling.Load():
			received = append(received, desc)
		default:
			partial = append(partial, desc+": reply still being sent")
		}
	}
	slices.Sort(received)
	slices.Sort(partial)
	return received, partial
}
