<?php
// page.php: the user's page. It prepares the user's channel once (or reuses
// it), keeps the publisher token here, and prints the subscriber token into
// the page's JavaScript.
require __DIR__ . '/channels.php';

$user = 'demo-user'; // your session's user
$hook = 'http://' . $_SERVER['HTTP_HOST'] . rtrim(dirname($_SERVER['SCRIPT_NAME']), '/') . '/hook.php';
$channel = channel_of($user, $hook);
$gockets = getenv('GOCKETS_WS_URL') ?: 'ws://127.0.0.1:8844'; // what the browser reaches
?>
<!doctype html>
<meta charset="utf-8">
<title>Gockets</title>
<p id="connection">connecting…</p>
<ul id="messages"></ul>
<script>
  const GOCKETS = <?= json_encode($gockets) ?>;
  const token = <?= json_encode($channel['subscriber_token']) ?>;
  const connection = document.getElementById("connection");
  const messages = document.getElementById("messages");
  const show = (text) => messages.append(Object.assign(document.createElement("li"), { textContent: text }));
  let wait = 1000; // before reconnecting: 1 s, doubling up to 30 s

  function connect() {
    const ws = new WebSocket(`${GOCKETS}/channel/subscribe/${token}`);
    ws.onopen = () => {
      wait = 1000;
      connection.textContent = "connected";
      ws.send(JSON.stringify({ hello: "from the page" })); // Gockets POSTs it to the hook
    };
    ws.onmessage = (event) => show(event.data);
    ws.onclose = (event) => {
      if (event.code === 1000) return (connection.textContent = "channel deleted");
      connection.textContent = `closed (${event.code}); reconnecting in ${wait / 1000} s`;
      setTimeout(connect, wait);
      wait = Math.min(wait * 2, 30000);
    };
  }
  connect();
</script>
