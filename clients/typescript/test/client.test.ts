// The SDK against the real gateway binary.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { type Message, SwitchboardClient, SwitchboardError, login, register } from "../src/index.js";
import { Gateway, S3Server, Sockets, until } from "./gateway.js";

let gw: Gateway;

before(async () => {
  gw = await Gateway.start();
});

after(async () => {
  await gw.stop();
});

/** A client and everything it was shown, by conversation. */
function client(token: string, sockets = new Sockets(), positions?: Record<string, number>, g = gw) {
  const c = new SwitchboardClient({
    url: g.url,
    token,
    WebSocket: sockets.WebSocket,
    positions,
    backoff: { initialMs: 50, maxMs: 500 },
  });
  const seen: Message[] = [];
  c.on("message", (m) => seen.push(m));
  return { c, seen, sockets };
}

/** Two fresh users, both connected, and their direct conversation. */
async function pair(prefix: string, g = gw) {
  const [ua, ub] = await g.users(prefix, 2);
  const alice = client(ua.token, new Sockets(), undefined, g);
  const bob = client(ub.token, new Sockets(), undefined, g);
  await Promise.all([alice.c.connect(), bob.c.connect()]);
  const conv = (await alice.c.createDirect(ub.user_id)).conversation_id;
  return { ua, ub, alice, bob, conv };
}

/** Every message shown in `conversation`, checked gap-free and once each. */
function shown(seen: Message[], conversation: string, from = 1): Message[] {
  const ms = seen.filter((m) => m.conversation_id === conversation);
  ms.forEach((m, i) => assert.equal(m.seq, from + i, `positions shown in order, once: ${ms.map((x) => x.seq)}`));
  return ms;
}

/** The whole stored history of a conversation, oldest first. */
async function wholeHistory(c: SwitchboardClient, conversation: string): Promise<Message[]> {
  const out: Message[] = [];
  let after = 0;
  for (;;) {
    const page = await c.history(conversation, { after, limit: 100 });
    out.push(...page.messages);
    if (!page.has_more || page.messages.length === 0) return out;
    after = page.messages[page.messages.length - 1].seq;
  }
}

test("register, log in, chat: the ack carries the position the recipient sees", { timeout: 120_000 }, async () => {
  const password = "correct horse battery";
  await register(gw.url, "sdk_alice", password);
  await register(gw.url, "sdk_bob", password);
  const a = await login(gw.url, "sdk_alice", password);
  const b = await login(gw.url, "sdk_bob", password);
  const alice = client(a.token);
  const bob = client(b.token);
  await Promise.all([alice.c.connect(), bob.c.connect()]);
  assert.equal(alice.c.userId, a.user_id);
  const conv = await alice.c.createDirect(b.user_id);
  assert.equal(conv.kind, "direct");
  const ack = await alice.c.send(conv.conversation_id, "hi bob");
  assert.equal(ack.seq, 1);
  await until("bob's message", () => bob.seen.length === 1);
  assert.equal(bob.seen[0].body, "hi bob");
  assert.equal(bob.seen[0].seq, ack.seq);
  assert.equal(bob.seen[0].sender_id, a.user_id);
  // Your own sends are shown to you too, once, at their position.
  assert.deepEqual(
    alice.seen.map((m) => [m.seq, m.body]),
    [[1, "hi bob"]],
  );
  // A final error rejects with the protocol's code and is not retried.
  await assert.rejects(alice.c.send("1", "nowhere"), (e: SwitchboardError) => {
    assert.equal(e.name, "not_found");
    assert.equal(e.retryable, false);
    return true;
  });
  assert.deepEqual(alice.c.pendingSends(), []);
  alice.c.close();
  bob.c.close();
});

test("a drop in the middle of a burst: every send acked once, nothing stored twice, shown in order", { timeout: 120_000 }, async () => {
  const { alice, bob, conv } = await pair("burst");
  const n = 300;
  // Cut the socket as alice is shown her 20th acked send, while the rest are on
  // the wire or not yet answered.
  let shownOwn = 0;
  alice.c.on("message", () => {
    if (++shownOwn === 20) alice.sockets.drop();
  });
  let ackedAtDrop = -1;
  alice.c.on("disconnected", () => {
    if (ackedAtDrop < 0) ackedAtDrop = acks.size;
  });
  const acks = new Map<string, number>();
  const sends = Array.from({ length: n }, (_, i) =>
    alice.c.send(conv, `m${i}`, `burst-${i}`).then((ack) => {
      assert.ok(!acks.has(ack.client_msg_id), "each send resolves once");
      acks.set(ack.client_msg_id, ack.seq);
    }),
  );
  await Promise.all(sends);
  assert.ok(ackedAtDrop >= 0 && ackedAtDrop < n, `the connection dropped with sends unanswered (${ackedAtDrop} acked)`);
  assert.equal(acks.size, n);
  const seqs = [...acks.values()].sort((x, y) => x - y);
  assert.deepEqual(seqs, Array.from({ length: n }, (_, i) => i + 1), "one position per send, no gaps");
  // The store holds each send once.
  const stored = await wholeHistory(bob.c, conv);
  assert.equal(stored.length, n);
  assert.equal(new Set(stored.map((m) => m.client_msg_id)).size, n);
  // Both sides were shown every message once, in order.
  await until("bob shown all", () => bob.seen.length >= n);
  assert.equal(shown(bob.seen, conv).length, n);
  assert.equal(shown(alice.seen, conv).length, n);
  alice.c.close();
  bob.c.close();
});

test("a gateway killed with -9 and restarted: sends made meanwhile are delivered, once and in order", { timeout: 120_000 }, async () => {
  const { alice, bob, conv } = await pair("restart");
  for (let i = 0; i < 20; i++) await alice.c.send(conv, `before ${i}`);
  await until("bob shown the first 20", () => bob.seen.length === 20);

  await gw.kill9();
  await until("both offline", () => alice.c.state === "offline" && bob.c.state === "offline");
  // Sent while the gateway is down: queued, and sent after the reconnect.
  const during = Array.from({ length: 20 }, (_, i) => alice.c.send(conv, `during ${i}`));
  await gw.restart();
  const acks = await Promise.all(during);
  assert.deepEqual(
    acks.map((a) => a.seq),
    Array.from({ length: 20 }, (_, i) => 21 + i),
  );
  await until("bob shown all 40", () => bob.seen.length >= 40);
  const ms = shown(bob.seen, conv);
  assert.equal(ms.length, 40);
  assert.deepEqual(
    ms.slice(20).map((m) => m.body),
    Array.from({ length: 20 }, (_, i) => `during ${i}`),
  );
  alice.c.close();
  bob.c.close();
});

test("a reconnect replays 1,000 missed messages in order, and nothing already held", { timeout: 120_000 }, async () => {
  const { ub, alice, bob, conv } = await pair("replay");
  for (let i = 0; i < 5; i++) await alice.c.send(conv, `held ${i}`);
  await until("bob holds 5", () => bob.seen.length === 5);
  // Bob goes away with his positions, as an app persists them.
  const held = bob.c.getPositions();
  assert.equal(held[conv], 5);
  bob.c.close();
  await Promise.all(Array.from({ length: 1000 }, (_, i) => alice.c.send(conv, `missed ${i}`)));
  const back = client(ub.token, new Sockets(), held);
  let synced = 0;
  back.c.on("synced", (d) => {
    synced = d.messages;
  });
  await back.c.connect();
  assert.equal(synced, 1000, "the sync replayed exactly what was missed");
  const ms = shown(back.seen, conv, 6);
  assert.equal(ms.length, 1000);
  assert.equal(ms[0].body, "missed 0");
  assert.equal(ms[999].body, "missed 999");
  alice.c.close();
  back.c.close();
});

test("typing expires, receipts and reactions arrive as typed events", { timeout: 120_000 }, async () => {
  const { ub, alice, bob, conv } = await pair("events");
  const typing: boolean[] = [];
  bob.c.on("typing", (t) => typing.push(t.typing));
  alice.c.typing(conv, true);
  await until("typing shown", () => typing.length === 1);
  assert.deepEqual(typing, [true]);
  // A message from the typist ends it at once.
  const ack = await alice.c.send(conv, "done typing");
  await until("typing stopped", () => typing.length === 2);
  assert.deepEqual(typing, [true, false]);

  const receipts: number[] = [];
  alice.c.on("receipt", (r) => {
    if (r.user_id === ub.user_id) receipts.push(r.read_seq);
  });
  bob.c.markRead(conv, ack.seq);
  await until("seen receipt", () => receipts.includes(ack.seq));
  const r = await alice.c.getReceipts(conv);
  assert.equal(r.members.find((m) => m.user_id === ub.user_id)?.read_seq, ack.seq);

  const reactions: string[] = [];
  alice.c.on("reaction", (x) => reactions.push(x.emoji));
  await bob.c.react(conv, ack.seq, "👍");
  await until("reaction", () => reactions.length === 1);
  assert.deepEqual(reactions, ["👍"]);
  const list = await alice.c.listConversations();
  assert.equal(list.items.find((i) => i.conversation_id === conv)?.unread, 0);
  alice.c.close();
  bob.c.close();
});

/** sendFile and downloadUrl through `g`, whichever blob backend it runs. */
async function sendFileThrough(g: Gateway): Promise<string> {
  const { alice, bob, conv } = await pair("files", g);
  const bytes = new Uint8Array(700_000).map((_, i) => (i * 7) & 0xff);
  const progress: number[] = [];
  const ack = await alice.c.sendFile(conv, bytes, {
    caption: "the plan",
    fileName: "plan.pdf",
    mediaType: "application/pdf",
    onProgress: (sent) => progress.push(sent),
  });
  assert.equal(progress.at(-1), bytes.length, "progress reaches the whole file");
  await until("the message with its attachment at bob", () => bob.seen.some((m) => m.seq === ack.seq));
  const m = bob.seen.find((x) => x.seq === ack.seq)!;
  assert.equal(m.body, "the plan");
  assert.deepEqual(
    [m.attachment?.file_name, m.attachment?.media_type, m.attachment?.size],
    ["plan.pdf", "application/pdf", bytes.length],
  );
  // Bob downloads it by its URL: the same bytes.
  const url = await bob.c.downloadUrl(m.attachment!);
  const got = new Uint8Array(await (await fetch(url)).arrayBuffer());
  assert.equal(Buffer.compare(Buffer.from(got), Buffer.from(bytes)), 0);
  // The sender's own message carries it too.
  assert.equal(alice.seen.find((x) => x.seq === ack.seq)?.attachment?.sha256, m.attachment?.sha256);

  await assert.rejects(alice.c.sendFile(conv, bytes, { mediaType: "text/html", fileName: "x.html" }), (e: Error) => {
    assert.equal((e as { name: string }).name, "media_type_not_allowed");
    return true;
  });
  await assert.rejects(alice.c.sendFile(conv, bytes, { mediaType: "application/pdf", fileName: "../x.pdf" }), (e: Error) => {
    assert.equal((e as { name: string }).name, "invalid_file_name");
    return true;
  });
  alice.c.close();
  bob.c.close();
  return url;
}

test("sendFile uploads straight to the store and the message carries the attachment; refusals are coded", async () => {
  await sendFileThrough(gw);
});

test("sendFile on the S3 backend: the bytes go to a real S3-compatible server and back", async (t) => {
  const s3 = await S3Server.start();
  if (!s3) return t.skip("set SWITCHBOARD_S3S_FS to an s3s-fs binary (scripts/test installs one)");
  const g = await Gateway.start(s3.toml());
  try {
    const url = await sendFileThrough(g);
    assert.ok(url.startsWith(`http://127.0.0.1:${s3.port}/switchboard/`), `a presigned URL on the object store: ${url}`);
  } finally {
    await g.stop();
    await s3.stop();
  }
});

test('a new device with startAt "latest" replays nothing old, then gets what is new; history pages the rest', async () => {
  const { ub, alice, bob, conv } = await pair("fresh");
  for (let i = 1; i <= 30; i++) await alice.c.send(conv, `old ${i}`);
  bob.c.close();
  const device = new SwitchboardClient({ url: gw.url, token: ub.token, WebSocket: new Sockets().WebSocket, startAt: "latest" });
  const seen: Message[] = [];
  const synced: number[] = [];
  device.on("message", (m) => seen.push(m));
  device.on("synced", (d) => synced.push(d.messages));
  await device.connect();
  assert.deepEqual(synced, [0], "nothing replayed");
  assert.deepEqual(device.getPositions(), { [conv]: 30 });
  await alice.c.send(conv, "new");
  await until("the new message", () => seen.length === 1);
  assert.deepEqual([seen[0].seq, seen[0].body], [31, "new"]);
  const page = await device.history(conv, { before: 31, limit: 100 });
  assert.equal(page.messages.length, 30, "the old ones are a history page away");
  device.close();
  alice.c.close();
});
