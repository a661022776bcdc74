<?php
// channels.php: each user's channel, kept in a file for the example. Your app
// keeps it in its database, next to the user; the publisher token never
// leaves the server.
require __DIR__ . '/gockets.php';

const CHANNELS_FILE = 'gockets-example-channels.json'; // in the temporary directory

function saved_channels(): array
{
    $json = @file_get_contents(sys_get_temp_dir() . '/' . CHANNELS_FILE);
    return $json === false ? [] : json_decode($json, true);
}

// channel_of returns the user's channel, or prepares one whose hook is $hookUrl.
function channel_of(string $user, string $hookUrl): array
{
    $channels = saved_channels();
    if (isset($channels[$user])) {
        try { // still there? (not after a restart without -state-file, or a delete)
            return gockets('GET', '/channel/' . $channels[$user]['publisher_token']);
        } catch (RuntimeException $e) {
            if ($e->getCode() !== 404) {
                throw $e;
            }
        }
    }
    $channels[$user] = gockets('POST', '/channel/prepare', json_encode([
        'subscriber_message_hook_url' => $hookUrl,
        'tag' => $user,
    ]));
    file_put_contents(sys_get_temp_dir() . '/' . CHANNELS_FILE, json_encode($channels), LOCK_EX);
    return $channels[$user];
}
