#!/usr/bin/env node
// Serves the web chat and passes its API calls and WebSocket to a running
// gateway, so the page, the HTTP API and the socket share one origin (the
// gateway sends no CORS headers).
//
//   node serve.mjs [--gateway http://127.0.0.1:8080] [--listen 127.0.0.1:5173]
//                  [--store http://127.0.0.1:9000/switchboard]
//
// With --store (a gateway on the S3 attachments backend whose bucket sends no
// CORS headers), requests under the bucket's path are passed to the object
// store unchanged, Host header included: set the gateway's
// `attachments.s3.public_endpoint` to this server's URL, so the presigned URLs
// it signs name this origin.
//
// Prints one JSON line when it listens: {"ready":true,"url":"http://..."}.

import { createReadStream, existsSync, statSync } from "node:fs";
import { createServer, request } from "node:http";
import { connect } from "node:net";
import { dirname, extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

const here = dirname(fileURLToPath(import.meta.url));
const { values: args } = parseArgs({
  options: {
    gateway: { type: "string", default: process.env.SWITCHBOARD_URL ?? "http://127.0.0.1:8080" },
    listen: { type: "string", default: "127.0.0.1:5173" },
    store: { type: "string" },
  },
});
const store = args.store ? new URL(args.store) : null;
if (store && (store.protocol !== "http:" || store.pathname.length < 2)) {
  console.error(`--store must be an http:// URL with the bucket's path (got ${args.store})`);
  process.exit(2);
}
const storePrefix = store ? `${store.pathname.replace(/\/$/, "")}/` : null;
const gateway = new URL(args.gateway);
if (gateway.protocol !== "http:") {
  console.error(`--gateway must be an http:// URL (got ${args.gateway})`);
  process.exit(2);
}
const [listenHost, listenPort] = args.listen.split(/:(?=\d+$)/);

// URL prefix -> directory. The SDK is served as built (clients/typescript/dist).
const roots = [
  ["/app/", join(here, "dist")],
  ["/sdk/", resolve(here, "../typescript/dist/src")],
  ["/", join(here, "public")],
];
for (const [, dir] of roots) {
  if (!existsSync(dir)) {
    console.error(`${dir} is missing: build first (scripts/web-chat does it)`);
    process.exit(2);
  }
}
const types = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".map": "application/json",
  ".png": "image/png",
  ".svg": "image/svg+xml",
};

function file(path) {
  const pathname = path === "/" ? "/index.html" : path;
  for (const [prefix, dir] of roots) {
    if (!pathname.startsWith(prefix)) continue;
    const full = normalize(join(dir, decodeURIComponent(pathname.slice(prefix.length))));
    if (!full.startsWith(dir)) return null;
    return existsSync(full) && statSync(full).isFile() ? full : null;
  }
  return null;
}

const proxied = (path) => path.startsWith("/v1/") || path === "/healthz" || path === "/readyz";

const server = createServer((req, res) => {
  const path = new URL(req.url ?? "/", "http://x").pathname;
  const toStore = storePrefix !== null && path.startsWith(storePrefix);
  if (proxied(path) || toStore) {
    const to = toStore ? store : gateway;
    const up = request(
      { host: to.hostname, port: to.port || 80, method: req.method, path: req.url, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      },
    );
    up.on("error", (e) => {
      res.writeHead(502, { "content-type": "application/json" });
      const what = toStore ? "object store" : "gateway";
      res.end(JSON.stringify({ error: { code: 0, name: "unavailable", message: `${what} unreachable: ${e.message}` } }));
    });
    req.pipe(up);
    return;
  }
  const full = req.method === "GET" ? file(path) : null;
  if (!full) {
    res.writeHead(404, { "content-type": "text/plain" });
    res.end("not found");
    return;
  }
  res.writeHead(200, { "content-type": types[extname(full)] ?? "application/octet-stream", "cache-control": "no-cache" });
  createReadStream(full).pipe(res);
});

// WebSocket upgrades pass through as bytes: the head as received, then both ways.
server.on("upgrade", (req, socket, head) => {
  if (!proxied(new URL(req.url ?? "/", "http://x").pathname)) {
    socket.destroy();
    return;
  }
  const up = connect(Number(gateway.port || 80), gateway.hostname, () => {
    const lines = [`${req.method} ${req.url} HTTP/1.1`];
    for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
    up.write(lines.join("\r\n") + "\r\n\r\n");
    if (head.length) up.write(head);
    up.pipe(socket);
    socket.pipe(up);
  });
  const end = () => {
    up.destroy();
    socket.destroy();
  };
  up.on("error", end);
  socket.on("error", end);
  up.on("close", end);
  socket.on("close", end);
});

server.listen(Number(listenPort), listenHost, () => {
  const a = server.address();
  const url = `http://${a.address}:${a.port}`;
  console.log(JSON.stringify({ ready: true, url, gateway: gateway.origin }));
  if (process.stdout.isTTY) console.error(`web chat on ${url}, against the gateway at ${gateway.origin}`);
});
