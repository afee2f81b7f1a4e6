// A Node.js client of a deploykit stack (mqtt.js 5): streams the answer, retries with the same
// requestId, sets TCP_NODELAY.
//
//   npm ci --prefix examples/node
//   DEPLOYKIT_PASSWORD_FILE=/path/to/mqtt_client_general_password \
//     node examples/node/chat-client.mjs --port 1883 --project general "Where is the key?"
//
// `deploykit credentials --project general` prints the port and the password file. The protocol:
// deploykit/bridge/README.md. The password comes from a file, never from the command line.
// Retries keep the requestId, so a request answered after all is not generated twice; retried:
// no reply within --timeout, and errors the envelope marks "retryable".
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import mqtt from "mqtt";

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "1883" },
    project: { type: "string", default: "general" },
    session: { type: "string", default: `example-${randomUUID().slice(0, 8)}` },
    "request-id": { type: "string" },
    timeout: { type: "string", default: "60" },
    retries: { type: "string", default: "3" },
  },
});
const message = positionals.join(" ");
const passwordFile = process.env.DEPLOYKIT_PASSWORD_FILE;
if (!message || !passwordFile) {
  console.error("usage: DEPLOYKIT_PASSWORD_FILE=FILE node chat-client.mjs [--port N] MESSAGE");
  process.exit(2);
}
const password = readFileSync(passwordFile, "utf8").trim();
const project = opts.project;
const replyTopic = `${project}/assistant_response/client-${randomUUID().slice(0, 12)}`;

const client = mqtt.connect(`mqtt://${opts.host}:${opts.port}`, {
  username: project,
  password,
  protocolVersion: 5,
});
// Nagle's algorithm would hold a request sent right after acknowledging a reply for ~40 ms.
client.on("connect", () => client.stream.setNoDelay(true));
let closing = false;
client.on("error", (err) => {
  // After a retry the bridge answers the repeat too (from its cache): that reply may arrive while
  // the client closes, and acknowledging it then fails with "write after end". Nothing is lost.
  if (closing) return;
  console.error(`error: ${err.message}`);
  process.exit(1);
});

const pending = new Map(); // requestId -> {resolve, shown, lastSeq}
client.on("message", (topic, payload) => {
  const data = JSON.parse(payload.toString());
  const entry = pending.get(data.requestId);
  if (!entry) return;
  if (topic.endsWith("/stream")) {
    if (data.seq > entry.lastSeq) { // a retry may stream again: show each part once
      entry.lastSeq = data.seq;
      entry.shown += data.delta;
      process.stdout.write(data.delta);
    }
  } else {
    entry.resolve(data);
  }
});

async function ask(text, { sessionId, requestId = randomUUID(), timeoutS, retries }) {
  const entry = { shown: "", lastSeq: -1 };
  pending.set(requestId, entry);
  const request = { sessionId, requestId, message: text, replyTopic, format: "json", stream: true };
  try {
    for (let attempt = 0; ; attempt++) {
      const reply = new Promise((resolve) => { entry.resolve = resolve; });
      await client.publishAsync(`${project}/user_input`, JSON.stringify(request), { qos: 1 });
      let timer;
      const timeout = new Promise((resolve) => { timer = setTimeout(resolve, timeoutS * 1000, null); });
      const data = await Promise.race([reply, timeout]);
      clearTimeout(timer);
      let why;
      if (data === null) why = `no reply within ${timeoutS} s`;
      else if (data.status === "ok" || !data.error?.retryable) {
        if (data.status === "ok") process.stdout.write(data.text.slice(entry.shown.length));
        return data;
      } else why = `${data.error.code}: ${data.error.message}`;
      if (attempt >= retries) throw new Error(`${why}; gave up after ${attempt + 1} attempts`);
      const delay = Math.min(2 ** attempt, 10);
      console.error(`[${why}; retrying with the same requestId in ${delay} s]`);
      await new Promise((resolve) => setTimeout(resolve, delay * 1000));
    }
  } finally {
    pending.delete(requestId);
  }
}

await new Promise((resolve) => client.once("connect", resolve));
await client.subscribeAsync([replyTopic, `${replyTopic}/stream`], { qos: 1 });
try {
  const reply = await ask(message, {
    sessionId: opts.session,
    requestId: opts["request-id"],
    timeoutS: Number(opts.timeout),
    retries: Number(opts.retries),
  });
  process.stdout.write("\n");
  if (reply.status !== "ok") {
    console.error(`error ${reply.error.code}: ${reply.error.message}`);
    process.exitCode = 1;
  } else {
    console.error(`[${reply.requestId}: ${JSON.stringify(reply.usage)}]`);
  }
} catch (err) {
  console.error(`error: ${err.message}`);
  process.exitCode = 1;
} finally {
  closing = true;
  await client.endAsync();
}
