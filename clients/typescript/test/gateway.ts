// Test support: the real gateway binary, started on a free port in a temp dir
// and waited for by its readiness line (no sleeps), and users minted through
// its admin endpoint.

import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { type AddressInfo, connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { WebSocket as NodeWebSocket } from "ws";
import type { WebSocketConstructor, WebSocketLike } from "../src/index.js";

const ADMIN = "sdk-test-admin-secret-0123456789abcdef";
const TOKEN_SECRET = "sdk-test-token-secret-0123456789abcdef";

function binary(): string {
  const env = process.env.SWITCHBOARD_GATEWAY;
  if (env) return resolve(env);
  const root = resolve(import.meta.dirname, "../../../..");
  for (const p of ["target/release/gateway", "target/debug/gateway"]) {
    if (existsSync(join(root, p))) return join(root, p);
  }
  throw new Error("no gateway binary: build it (cargo build -p gateway) or set SWITCHBOARD_GATEWAY");
}

export class Gateway {
  readonly dir: string;
  private child: ChildProcess | null = null;
  addr = "";

  private constructor(dir: string) {
    this.dir = dir;
  }

  /** A gateway on a fresh data directory, listening on a port the kernel picks;
   * `extra` is appended to its config file (TOML sections). */
  static async start(extra = ""): Promise<Gateway> {
    const g = new Gateway(mkdtempSync(join(tmpdir(), "switchboard-sdk-")));
    writeFileSync(
      join(g.dir, "gateway.toml"),
      `shards = 2
[auth]
token_secret = "${TOKEN_SECRET}"
admin_secret = "${ADMIN}"
argon2_memory_kib = 256
argon2_iterations = 1
[limits]
send_per_sec = 1000000
send_burst = 1000000
group_adds = "anyone"
groups_burst = 1000000
drain_notice_ms = 0
${extra}`,
    );
    await g.spawn("127.0.0.1:0");
    return g;
  }

  get url(): string {
    return `http://${this.addr}`;
  }

  private spawn(listen: string): Promise<void> {
    const child = spawn(
      binary(),
      ["--config", join(this.dir, "gateway.toml"), "--listen", listen, "--data-dir", join(this.dir, "data")],
      { stdio: ["ignore", "pipe", openSync(join(this.dir, "gateway.log"), "a")] },
    );
    this.child = child;
    return new Promise((ok, fail) => {
      const lines = createInterface({ input: child.stdout! });
      lines.once("line", (line) => {
        const ready = JSON.parse(line) as { ready: boolean; addr: string };
        if (!ready.ready) fail(new Error(`gateway not ready: ${line}`));
        this.addr = ready.addr;
        ok();
      });
      child.once("exit", (code) =>
        fail(new Error(`gateway exited (${code}) before it was ready:\n${readFileSync(join(this.dir, "gateway.log"), "utf8")}`)),
      );
    });
  }

  /** SIGKILL: no shutdown path at all. */
  async kill9(): Promise<void> {
    const child = this.child!;
    const exited = new Promise((ok) => child.once("exit", ok));
    child.kill("SIGKILL");
    await exited;
    this.child = null;
  }

  /** Starts again on the same data directory and the same port (clients keep their URL). */
  async restart(): Promise<void> {
    await this.spawn(this.addr);
  }

  async stop(): Promise<void> {
    if (this.child) await this.kill9();
    rmSync(this.dir, { recursive: true, force: true });
  }

  /** `count` users with tokens, from the admin endpoint. */
  async users(prefix: string, count: number): Promise<{ user_id: string; username: string; token: string }[]> {
    const res = await fetch(`${this.url}/v1/admin/users`, {
      method: "POST",
      headers: { authorization: `Bearer ${ADMIN}`, "content-type": "application/json" },
      body: JSON.stringify({ prefix, start: 0, count }),
    });
    if (!res.ok) throw new Error(`minting users: ${res.status} ${await res.text()}`);
    return ((await res.json()) as { users: { user_id: string; username: string; token: string }[] }).users;
  }
}

/** A `ws` socket in the SDK's shape that can be cut: after `cut`, nothing more
 * it received is handed on, as if it were lost on the way. */
class Cuttable implements WebSocketLike {
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  cut = false;
  readonly ws: NodeWebSocket;

  constructor(url: string, protocols?: string | string[]) {
    this.ws = new NodeWebSocket(url, protocols);
    this.ws.on("open", () => this.onopen?.({}));
    this.ws.on("message", (data, isBinary) => {
      if (!this.cut) this.onmessage?.({ data: isBinary ? data : data.toString() });
    });
    this.ws.on("close", (code, reason) => this.onclose?.({ code, reason: reason.toString() }));
    this.ws.on("error", (e) => this.onerror?.(e));
  }

  send(data: string): void {
    this.ws.send(data);
  }

  close(code?: number, reason?: string): void {
    this.ws.close(code, reason);
  }
}

/** `ws` in the SDK's shape, recording every socket so a test can cut one. */
export class Sockets {
  readonly all: Cuttable[] = [];

  readonly WebSocket: WebSocketConstructor = ((outer: Sockets) =>
    class extends Cuttable {
      constructor(url: string, protocols?: string | string[]) {
        super(url, protocols);
        outer.all.push(this);
      }
    })(this);

  /** Cuts the newest socket as a network drop would: no close handshake, and
   * whatever was still in flight to the client is lost. */
  drop(): void {
    const s = this.all[this.all.length - 1];
    if (!s) return;
    s.cut = true;
    s.ws.terminate();
  }

}

/** Resolves when `check` holds, re-checked on every event it is told of. */
export function until(what: string, check: () => boolean, timeoutMs = 30_000): Promise<void> {
  return new Promise((ok, fail) => {
    const started = Date.now();
    const tick = () => {
      if (check()) return ok();
      if (Date.now() - started > timeoutMs) return fail(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 5);
    };
    tick();
  });
}

/** A real S3-compatible server (`s3s-fs`, from `SWITCHBOARD_S3S_FS`; scripts/test
 * installs it) on a free loopback port, with the bucket `switchboard`; `null`
 * without it. */
export class S3Server {
  private constructor(
    private readonly child: ChildProcess,
    private readonly dir: string,
    readonly port: number,
  ) {}

  static async start(): Promise<S3Server | null> {
    const bin = process.env.SWITCHBOARD_S3S_FS;
    if (!bin) return null;
    const dir = mkdtempSync(join(tmpdir(), "switchboard-s3-"));
    mkdirSync(join(dir, "switchboard"));
    const port = await new Promise<number>((ok) => {
      const srv = createServer().listen(0, "127.0.0.1", () => {
        const p = (srv.address() as AddressInfo).port;
        srv.close(() => ok(p));
      });
    });
    const child = spawn(
      bin,
      ["--host", "127.0.0.1", "--port", String(port), "--access-key", "sdk-test", "--secret-key", "sdk-test-secret", dir],
      { stdio: "ignore" },
    );
    const s = new S3Server(child, dir, port);
    const listening = () =>
      new Promise<boolean>((ok) => {
        const c = connect(port, "127.0.0.1", () => ok(c.end() !== undefined)).on("error", () => ok(false));
      });
    const deadline = Date.now() + 20_000;
    while (!(await listening())) {
      if (Date.now() > deadline) throw new Error("s3s-fs did not listen");
      await new Promise((r) => setTimeout(r, 20));
    }
    return s;
  }

  /** The gateway's `[attachments.s3]` section for this server; clients reach it
   * at `publicEndpoint` if given (a same-origin proxy in front of it). */
  toml(publicEndpoint?: string): string {
    return `[attachments.s3]
endpoint = "http://127.0.0.1:${this.port}"
bucket = "switchboard"
access_key = "sdk-test"
secret_key = "sdk-test-secret"
${publicEndpoint ? `public_endpoint = "${publicEndpoint}"` : ""}
`;
  }

  async stop(): Promise<void> {
    const exited = new Promise((ok) => this.child.once("exit", ok));
    this.child.kill("SIGKILL");
    await exited;
    rmSync(this.dir, { recursive: true, force: true });
  }
}
