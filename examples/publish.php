<?php
// publish.php: what your app does when something happens for a user:
//   php examples/publish.php 'Your order has shipped'
require __DIR__ . '/channels.php';

$user = 'demo-user';
$message = $argv[1] ?? 'Hello from publish.php at ' . date('H:i:s');
$channel = saved_channels()[$user] ?? null;
if ($channel === null) {
    fwrite(STDERR, "$user has no channel yet: open page.php first\n");
    exit(1);
}
$reply = gockets('POST', '/channel/publish/' . $channel['publisher_token'], $message);
echo $reply['queued']
    ? "kept \"$message\" for $user's page: nobody listens now; it gets it on connecting\n"
    : "sent \"$message\" to $user's page: {$reply['subscribers']} subscriber(s)\n";
