<?php
// gockets.php: the client, as one function (no extension needed); require it.
// It sends GOCKETS_ADMIN_TOKEN when the environment has it (with -admin-token).
// Admin routes answer only the Host named by -host-name: localhost by default.
function gockets(string $method, string $path, string $body = ''): array
{
    $headers = ['Content-Type: application/json'];
    if ($token = getenv('GOCKETS_ADMIN_TOKEN')) {
        $headers[] = "Authorization: Bearer $token";
    }
    $url = (getenv('GOCKETS_URL') ?: 'http://localhost:8844') . $path;
    $answer = @file_get_contents($url, false, stream_context_create(['http' => [
        'method'        => $method,
        'header'        => $headers,
        'content'       => $body,
        'timeout'       => 5,
        'ignore_errors' => true, // a 404 is an answer too
    ]]));
    if ($answer === false) {
        throw new RuntimeException("gockets: $url: " . (error_get_last()['message'] ?? 'no answer'));
    }
    $status = (int) explode(' ', $http_response_header[0])[1];
    $json = json_decode($answer, true);
    if ($status >= 400 || !is_array($json)) {
        throw new RuntimeException("gockets: $status " . ($json['message'] ?? $answer), $status);
    }
    return $json;
}
