// Across the nodes of a fleet: a reader whose gateway node is killed with -9
// reconnects through the load balancer to another node and shows every
// message once, in order. Runs against a fleet the caller started
// (scripts/local-cluster-check: three nodes behind HAProxy); skipped without one.
//
//   SWITCHBOARD_FLEET_URL     the balancer, http://host:port
//   SWITCHBOARD_ADMIN_SECRET  the nodes' admin secret
//   SWITCHBOARD_FLEET_PIDS    node1=PID,node2=PID,... (node N has node_id N)

import assert from "node:assert/strict";
import { test } from "node:test";
import { WebSocket } from "ws";
import { type Message, SwitchboardClient, type WebSocketConstructor } from "../src/index.js";
import { until } from "./gateway.js";

const url = process.env.SWITCHBOARD_FLEET_URL;
const pids = new Map(
  (process.env.SWITCHBOARD_FLEET_PIDS ?? "")
    .split(",")
    .filter(Boolean)
    .map((kv) => kv.split("=") as [string, string])
    .map(([name, pid]) => [Number(name.replace("node", "")), Number(pid)]),
);

/** The node holding a connection: the top 16 bits of its id. */
const nodeOf = (c: SwitchboardClient) => Number(BigInt(c.connectionId!) >> 48n);

test("a reader's node is killed: it reconnects to another node through the balancer and misses nothing", { skip: !url }, async () => {
  const res = await fetch(`${url}/v1/admin/users`, {
    method: "POST",
    headers: { authorization: `Bearer ${process.env.SWITCHBOARD_ADMIN_SECRET}`, "content-type": "application/json" },
    body: JSON.stringify({ prefix: `sdkfleet${Date.now() % 1_000_000}u`, count: 2 }),
  });
  assert.equal(res.status, 201);
  const [writerUser, readerUser] = ((await res.json()) as { users: { user_id: string; token: string }[] }).users;
  const opts = { url: url!, WebSocket: WebSocket as unknown as WebSocketConstructor, backoff: { initialMs: 100, maxMs: 1_000 } };
  const writer = new SwitchboardClient({ ...opts, token: writerUser.token });
  const reader = new SwitchboardClient({ ...opts, token: readerUser.token });
  const got: Message[] = [];
  reader.on("message", (m) => got.push(m));
  try {
    await writer.connect();
    await reader.connect();
    const conv = await writer.createDirect(readerUser.user_id);
    const bodies = Array.from({ length: 100 }, (_, i) => `fleet ${i + 1}`);
    await Promise.all(bodies.slice(0, 50).map((b) => writer.send(conv.conversation_id, b)));
    await until("the first 50 at the reader", () => got.length >= 50);

    const first = nodeOf(reader);
    const pid = pids.get(first);
    assert.ok(pid, `no pid for node ${first} in SWITCHBOARD_FLEET_PIDS`);
    process.kill(pid, "SIGKILL");
    // The writer may have been on that node too: its sends wait in the SDK's
    // queue and go after its own reconnect.
    await Promise.all(bodies.slice(50).map((b) => writer.send(conv.conversation_id, b)));
    await until("all 100 at the reader", () => got.length >= 100, 60_000);

    assert.notEqual(nodeOf(reader), first, "the reader is now on another node");
    assert.deepEqual(got.map((m) => m.body), bodies, "every message once, in order, across the move");
    assert.deepEqual(got.map((m) => m.seq), bodies.map((_, i) => i + 1));
  } finally {
    writer.close();
    reader.close();
  }
});
