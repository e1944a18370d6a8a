// A device that stays in IDLE for a long time: imapflow (a widely used
// Node.js IMAP client) logs in with a password, opens MAILBOX and idles; on
// every EXISTS it fetches the new messages' Message-IDs. After SECONDS it
// logs out and prints one JSON line: the Message-IDs seen, whether the
// server ended the session first, and every untagged BYE it sent.
//
//   node imap_idle.js PORT USER PASSWORD MAILBOX SECONDS
const { ImapFlow } = require("imapflow");

const [port, user, pass, mailbox, seconds] = process.argv.slice(2);
const seen = [];
const byes = [];
let closedEarly = false;
let leaving = false; // set before our own LOGOUT
const errors = [];

// imapflow logs each response it parses at debug level: keep the BYEs.
const keepBye = (o) => {
  const text = JSON.stringify(o);
  // The BYE that answers our own LOGOUT does not count.
  if (!leaving && text && text.includes("BYE")) byes.push(text);
};
const logger = {
  debug: keepBye,
  info: keepBye,
  warn: () => {},
  error: (o) => errors.push(String((o && o.msg) || o)),
};

async function main() {
  const client = new ImapFlow({
    host: "127.0.0.1",
    port: Number(port),
    secure: false,
    doSTARTTLS: false,
    auth: { user, pass },
    logger,
    // IDLE is re-issued by imapflow itself every few minutes; keep its default.
  });
  client.on("close", () => {
    if (!leaving) closedEarly = true;
  });
  client.on("error", (e) => errors.push(String(e && e.message)));
  await client.connect();
  const lock = await client.getMailboxLock(mailbox);
  let known = client.mailbox.exists;
  let fetching = Promise.resolve();
  client.on("exists", (data) => {
    const from = known + 1;
    known = data.count;
    if (data.count < from) return;
    fetching = fetching.then(async () => {
      for await (const msg of client.fetch(`${from}:${data.count}`, { envelope: true })) {
        seen.push(msg.envelope.messageId);
      }
    }).catch((e) => errors.push(String(e && e.message)));
  });
  await new Promise((r) => setTimeout(r, Number(seconds) * 1000));
  await fetching;
  leaving = true;
  lock.release();
  if (!closedEarly) await client.logout();
}

main()
  .catch((e) => errors.push(String(e && e.message)))
  .finally(() => {
    console.log(JSON.stringify({ seen, closedEarly, byes, errors }));
  });
