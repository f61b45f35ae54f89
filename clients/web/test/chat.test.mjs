// The web chat end to end: the real gateway binary (port 0, temp dir), the web
// chat's own server (serve.mjs) in front of it, and Debian's Chromium driven by
// playwright-core, two browser contexts as two people.
//
// Screenshots go to $SCREENSHOTS (default clients/web/test-results).

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { createServer } from "node:net";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { WebSocket } from "../../typescript/node_modules/ws/wrapper.mjs";
import { SwitchboardClient } from "../../typescript/dist/src/index.js";
import { Gateway, S3Server } from "../../typescript/dist/test/gateway.js";

const here = dirname(fileURLToPath(import.meta.url));
const shots = resolve(process.env.SCREENSHOTS ?? join(here, "..", "test-results"));
mkdirSync(shots, { recursive: true });

let gateway;
let server;
let web = "";
let browser;

before(async () => {
  // A short presence grace, so going away shows within the test.
  gateway = await Gateway.start("[presence]\ngrace_ms = 300\n");
  server = spawn(process.execPath, [join(here, "..", "serve.mjs"), "--gateway", gateway.url, "--listen", "127.0.0.1:0"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  web = await new Promise((ok, fail) => {
    createInterface({ input: server.stdout }).once("line", (line) => ok(JSON.parse(line).url));
    server.once("exit", (code) => fail(new Error(`serve.mjs exited (${code})`)));
  });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    // Root in a container: Chromium's sandbox needs user namespaces it may not get.
    args: ["--no-sandbox"],
  });
});

after(async () => {
  await browser?.close();
  server?.kill();
  await gateway?.stop();
});

/** A new browser context (a person on their own device), logged in through the form. */
async function person(username, { create = true } = {}) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 640 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${username}] page error:`, e));
  await page.goto(web);
  await page.fill("#username", username);
  await page.fill("#password", "correct horse battery");
  await page.click(create ? "#register" : "#login");
  await page.locator("#status[data-state=live]").waitFor();
  return { context, page };
}

/** A person logged in with a token minted by the test (no login form). */
async function personWithToken(user, site = web) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 640 } });
  await context.addInitScript((s) => sessionStorage.setItem("switchboard", s), JSON.stringify(user));
  const page = await context.newPage();
  await page.goto(site);
  await page.locator("#status[data-state=live]").waitFor();
  return { context, page };
}

/** A loopback port nothing listens on now. */
function freePort() {
  return new Promise((ok) => {
    const srv = createServer().listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

async function type(page, text) {
  await page.fill("#composer", text);
  await page.press("#composer", "Enter");
}

/** The bodies of the open conversation's text messages, top to bottom, with their seqs. */
async function shown(page) {
  return page.$$eval("#messages .msg:not(.pending)", (els) =>
    els.map((e) => ({ seq: Number(e.getAttribute("data-seq")), body: e.querySelector(".body").textContent })),
  );
}

async function waitFor(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: 20_000 });
  } catch (e) {
    throw new Error(`waiting for ${what}: ${e.message}`);
  }
}

test("two people chat; one goes offline and, back online, shows what was missed once, in order; typing and seen receipts cross windows", async () => {
  const alice = await person("alice");
  const bob = await person("bob");

  // Alice finds bob by name and writes.
  await alice.page.fill("#new-chat", "bob");
  await alice.page.click("#start-chat");
  await alice.page.locator("#conversation-title", { hasText: "bob" }).waitFor();
  await type(alice.page, "hello bob");

  // Bob's list shows it unread, with the preview; opening it marks it seen.
  const item = bob.page.locator(".conv", { hasText: "hello bob" });
  await item.locator(".unread", { hasText: "1" }).waitFor();
  await item.locator(".title", { hasText: "alice" }).waitFor();
  await item.click();
  await bob.page.locator("#messages .msg .body", { hasText: "hello bob" }).waitFor();
  await alice.page.locator("#messages .msg.mine .receipt", { hasText: "seen" }).waitFor();
  await waitFor(bob.page, "the unread badge to clear", () => !document.querySelector(".conv .unread"));
  // Presence: each sees the other online.
  await alice.page.locator("#presence", { hasText: "online" }).waitFor();

  // Typing shows in the other window, and clears when the message comes.
  await bob.page.fill("#composer", "typing something");
  await bob.page.dispatchEvent("#composer", "input");
  await alice.page.locator("#typing", { hasText: "bob is typing" }).waitFor();
  await bob.page.screenshot({ path: join(shots, "bob-typing.png") });
  await alice.page.screenshot({ path: join(shots, "alice-sees-typing.png") });
  await bob.page.press("#composer", "Enter");
  await alice.page.locator("#messages .msg .body", { hasText: "typing something" }).waitFor();
  await waitFor(alice.page, "typing to clear", () => document.querySelector("#typing").textContent === "");

  // Bob loses the network; Alice writes 20 messages meanwhile.
  await bob.context.setOffline(true);
  await bob.page.locator("#status[data-state=offline]").waitFor();
  const missed = Array.from({ length: 20 }, (_, i) => `missed ${i + 1}`);
  for (const text of missed) await type(alice.page, text);
  await waitFor(alice.page, "every send acknowledged", () => !document.querySelector("#messages .pending"));
  await alice.page.locator("#messages .msg.mine .receipt", { hasText: "sent" }).last().waitFor();
  await bob.page.screenshot({ path: join(shots, "bob-offline.png") });

  // Back online: the SDK reconnects and syncs from the positions it held.
  await bob.context.setOffline(false);
  await bob.page.locator("#status[data-state=live]").waitFor();
  await bob.page.locator("#messages .msg .body", { hasText: "missed 20" }).waitFor();
  const seen = await shown(bob.page);
  assert.deepEqual(
    seen.map((m) => m.body),
    ["hello bob", "typing something", ...missed],
    "every message once, in order",
  );
  for (let i = 1; i < seen.length; i++) assert.equal(seen[i].seq, seen[i - 1].seq + 1, "no gap, no repeat");
  // Bob has the conversation open, so the replay is marked seen, and Alice sees it.
  await waitFor(
    alice.page,
    "alice's last message to show seen",
    () => [...document.querySelectorAll("#messages .msg.mine .receipt")].at(-1)?.textContent.includes("seen"),
  );
  await alice.page.screenshot({ path: join(shots, "alice-seen.png") });
  await bob.page.screenshot({ path: join(shots, "bob-after-reconnect.png") });

  assert.equal(await alice.page.textContent("#notice"), "", "no request was refused along the way");

  // Bob leaves; after the presence grace, Alice sees him gone.
  await bob.context.close();
  await alice.page.locator("#presence", { hasText: /last seen|offline/ }).waitFor();
  await alice.context.close();
});

test("history scrolls back page by page; groups with members; edit, delete and reactions reach the other window", async () => {
  const [carol, dave, erin] = await gateway.users("web", 3);
  // Carol (from Node, through the SDK) leaves 75 messages in her chat with Dave.
  const sdk = new SwitchboardClient({ url: gateway.url, token: carol.token, WebSocket });
  await sdk.connect();
  const direct = await sdk.createDirect(dave.user_id);
  const bodies = Array.from({ length: 75 }, (_, i) => `history ${i + 1}`);
  for (const b of bodies) await sdk.send(direct.conversation_id, b);

  const d = await personWithToken(dave);
  await d.page.locator(".conv", { hasText: "history 75" }).click();
  await d.page.locator("#messages .msg .body", { hasText: "history 75" }).waitFor();
  assert.equal((await shown(d.page)).length, 30, "the newest page first");
  // Scrolling to the top loads older pages, keeping order.
  for (let i = 0; i < 5 && (await d.page.locator("#older").count()) > 0; i++) {
    await d.page.$eval("#messages", (el) => (el.scrollTop = 0));
    await d.page.locator("#messages .msg .body", { hasText: /^history (31|1)$/ }).first().waitFor();
  }
  await d.page.locator("#messages .msg .body", { hasText: /^history 1$/ }).waitFor();
  assert.deepEqual((await shown(d.page)).map((m) => m.body), bodies, "all 75, oldest first, once each");
  assert.equal(await d.page.locator("#older").count(), 0, "nothing older remains");

  // Carol (in a browser now) makes a group with Dave and Erin.
  const c = await personWithToken(carol);
  await c.page.click("summary");
  await c.page.fill("#group-title", "launch team");
  await c.page.fill("#group-members", `${dave.username}, ${erin.username}`);
  await c.page.click("#create-group");
  await c.page.locator("#conversation-title", { hasText: "launch team" }).waitFor();
  await c.page.click("#toggle-members");
  await c.page.locator("#members .member", { hasText: `${erin.username} (member)` }).waitFor();
  assert.equal(await c.page.locator("#members .member").count(), 3);
  await type(c.page, "first draft");

  const groupItem = d.page.locator(".conv", { hasText: "launch team" });
  await groupItem.click();
  await d.page.locator("#messages .system", { hasText: "created the group" }).waitFor();
  await d.page.locator("#messages .msg .body", { hasText: "first draft" }).waitFor();

  // Carol edits it: Dave sees the new text, marked edited.
  const mine = c.page.locator("#messages .msg.mine", { hasText: "first draft" });
  await mine.hover();
  await mine.locator("button.edit").click();
  await c.page.fill("#composer", "final text");
  await c.page.press("#composer", "Enter");
  const onDave = d.page.locator("#messages .msg", { hasText: "final text" });
  await onDave.locator(".meta", { hasText: "edited" }).waitFor();

  // Dave reacts: Carol sees the count.
  await onDave.hover();
  await onDave.locator("button.react", { hasText: "👍" }).click();
  await c.page.locator("#messages .msg.mine .reactions", { hasText: "👍 1" }).waitFor();
  await c.page.screenshot({ path: join(shots, "group.png") });

  // Carol deletes it: Dave sees a tombstone, and the text is gone from his window.
  const edited = c.page.locator("#messages .msg.mine", { hasText: "final text" });
  await edited.hover();
  await edited.locator("button.delete").click();
  await d.page.locator("#messages .msg.deleted", { hasText: "message deleted" }).waitFor();
  assert.equal(await d.page.locator("#messages .msg", { hasText: "final text" }).count(), 0);
  await d.page.screenshot({ path: join(shots, "deleted.png") });

  sdk.close();
  await c.context.close();
  await d.context.close();
});

/** Sends an image and a file through the web chat at `site` (on gateway `g`);
 * `from` is where the other window must load the image from. */
async function imageAndFile(g, site, from, shot) {
  const [hana, ivan] = await g.users("pics", 2);
  const h = await personWithToken(hana, site);
  const i = await personWithToken(ivan, site);
  await h.page.fill("#new-chat", ivan.username);
  await h.page.click("#start-chat");
  await h.page.locator("#conversation-title", { hasText: ivan.username }).waitFor();
  await type(h.page, "a photo for you");
  await i.page.locator(".conv", { hasText: "a photo for you" }).click();
  await i.page.locator("#messages .msg .body", { hasText: "a photo for you" }).waitFor();

  // A real PNG (a piece of this very page), through the file picker.
  const png = await h.page.screenshot({ clip: { x: 0, y: 0, width: 300, height: 200 } });
  await h.page.setInputFiles("#file", { name: "view.png", mimeType: "image/png", buffer: png });
  await waitFor(h.page, "the upload to be acknowledged", () => !document.querySelector("#messages .pending"));
  // Ivan's window renders it from its download URL, at its size.
  await waitFor(i.page, "the image to render in the other window", (from) => {
    const img = document.querySelector("#messages img.attachment");
    return !!img && img.complete && img.naturalWidth === 300 && img.src.startsWith(from);
  }, from);
  await i.page.screenshot({ path: join(shots, shot) });

  // A text file dropped on the conversation: a download link with its name and bytes.
  await h.page.evaluate(() => {
    const dt = new DataTransfer();
    dt.items.add(new File(["meeting notes\n"], "notes.txt", { type: "text/plain" }));
    document.querySelector("#conversation").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
  });
  const link = i.page.locator("#messages a.file", { hasText: "notes.txt" });
  await link.waitFor();
  await waitFor(i.page, "the link's URL", () => !!document.querySelector("#messages a.file")?.getAttribute("href"));
  const text = await link.evaluate(async (a) => (await fetch(a.href)).text());
  assert.equal(text, "meeting notes\n");
  assert.equal(await h.page.textContent("#notice"), "");
  await h.context.close();
  await i.context.close();
}

test("an image sent from one window is shown in the other; a dropped file arrives as a download link", async () => {
  await imageAndFile(gateway, web, `${web}/v1/blobs/`, "image-received.png");
});

test("the same on the S3 backend: the bytes go between the browser and a real S3-compatible server", async (t) => {
  const s3 = await S3Server.start();
  if (!s3) return t.skip("set SWITCHBOARD_S3S_FS to an s3s-fs binary (scripts/test installs one)");
  // The chat's server is the bucket's public endpoint (s3s-fs sends no CORS
  // headers): its port is chosen first, so the gateway signs URLs for it.
  const port = await freePort();
  const site = `http://127.0.0.1:${port}`;
  const g = await Gateway.start(s3.toml(site));
  const front = spawn(
    process.execPath,
    [join(here, "..", "serve.mjs"), "--gateway", g.url, "--listen", `127.0.0.1:${port}`, "--store", `http://127.0.0.1:${s3.port}/switchboard`],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  try {
    await new Promise((ok, fail) => {
      createInterface({ input: front.stdout }).once("line", ok);
      front.once("exit", (code) => fail(new Error(`serve.mjs exited (${code})`)));
    });
    await imageAndFile(g, site, `${site}/switchboard/`, "image-received-s3.png");
  } finally {
    front.kill();
    await g.stop();
    await s3.stop();
  }
});

test("a bad password and a taken name are shown on the login form", async () => {
  const taken = await fetch(`${gateway.url}/v1/register`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ username: "gina", password: "correct horse battery" }),
  });
  assert.equal(taken.status, 201);
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(web);
  await page.fill("#username", "frank");
  await page.fill("#password", "short");
  await page.click("#register");
  await page.locator("#login-error", { hasText: /8 to 128/ }).waitFor();
  await page.fill("#username", "gina");
  await page.fill("#password", "correct horse battery");
  await page.click("#register");
  await page.locator("#login-error", { hasText: /registered already/ }).waitFor();
  await page.fill("#password", "wrong password!");
  await page.click("#login");
  await page.locator("#login-error", { hasText: /wrong password/ }).waitFor();
  await context.close();
});
