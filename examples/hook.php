<?php
// hook.php: Gockets POSTs here, raw, each message a browser sends on a
// channel whose subscriber_message_hook_url points here.
$body    = file_get_contents('php://input');
$channel = $_SERVER['HTTP_X_GOCKETS_CHANNEL'] ?? ''; // the subscriber token: whose channel
$event   = $_SERVER['HTTP_X_GOCKETS_EVENT'] ?? '';   // with -hook-events: connect or disconnect

// With -hook-secret, refuse what Gockets did not sign and what is older than
// 5 minutes. Without GOCKETS_HOOK_SECRET (the quick start) unsigned requests pass.
$secret = getenv('GOCKETS_HOOK_SECRET');
$signature = $_SERVER['HTTP_X_GOCKETS_SIGNATURE'] ?? '';
if ($secret === false || $secret === '') {
    if ($signature !== '') { // php-fpm: see "Settings under php-fpm"
        error_log('hook: the request is signed but GOCKETS_HOOK_SECRET is not in my environment');
        http_response_code(500);
        exit;
    }
} else {
    $timestamp = $_SERVER['HTTP_X_GOCKETS_TIMESTAMP'] ?? '';
    $delivery  = $_SERVER['HTTP_X_GOCKETS_DELIVERY_ID'] ?? '';
    $type      = $_SERVER['CONTENT_TYPE'] ?? '';
    // Everything the daemon sends is signed, one header a line, then the body.
    $signed    = "$timestamp\n$channel\n$event\n$delivery\n$type\n$body";
    $expected  = 'sha256=' . hash_hmac('sha256', $signed, $secret);
    if (!hash_equals($expected, $signature) || abs(time() - (int) $timestamp) > 300) {
        http_response_code(401);
        exit;
    }
}
// A retry carries the same X-Gockets-Delivery-Id: store the ids you handled
// (a UNIQUE column) and skip one you have seen.
error_log($event === '' ? "hook: a browser sent $body" : "hook: $event $body");
