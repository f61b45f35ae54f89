// The Switchboard client: one WebSocket (JSON subprotocol), reconnected with
// jittered exponential backoff, resynced from the positions it holds on every
// (re)connect, with a queue of sends that survives drops.
//
// Guarantees to the app (docs/protocol.md section 6 gives the server's side):
// - `message` fires once per message, in `seq` order per conversation, across
//   drops, gateway restarts and a different node of a fleet: each (re)connect
//   sends `sync` with the highest `seq` held per conversation, and anything at
//   or below it is dropped if it comes again.
// - `send` resolves once, with the server's `ack`, or rejects with the
//   protocol's coded error. A send is kept until then and sent again after a
//   reconnect with the same `client_msg_id` (the server stores it once); a
//   retryable refusal is retried with backoff; a final one rejects.
// - Your own sends appear as `message` events too, when acknowledged.

import { SwitchboardError, closed, connectionLost } from "./errors.js";
import { downloadUrl, requestUploadSlot, sha256Hex, upload } from "./http.js";
import type {
  Ack,
  Attachment,
  AttachmentRef,
  Conversation,
  ConversationList,
  HistoryPage,
  Id,
  Message,
  PresenceInfo,
  Reaction,
  Receipt,
  Receipts,
  Role,
  ServerFrame,
  SyncDone,
  Typing,
  Welcome,
} from "./types.js";

/** What the SDK needs of a WebSocket: the browser's, or `ws` in Node. */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ClientOptions {
  /** The gateway (or its load balancer): `http(s)://host:port` or `ws(s)://host:port`. */
  url: string;
  /** A bearer token from `login`, or a function giving a fresh one on every connect. */
  token: string | (() => string | Promise<string>);
  /** WebSocket implementation; default `globalThis.WebSocket` (browsers, Node 22+). */
  WebSocket?: WebSocketConstructor;
  /** Highest `seq` held per conversation (from an earlier session), for the first `sync`. */
  positions?: Record<Id, number>;
  /** With no positions held (a new device): `"all"` (default) replays every
   * conversation from its start; `"latest"` lists the conversations first and
   * syncs from their newest message, so nothing old is replayed (page it with
   * `history` when shown). */
  startAt?: "all" | "latest";
  /** Reconnect backoff: a random delay up to min(maxMs, initialMs * 2^attempt). */
  backoff?: { initialMs?: number; maxMs?: number };
  /** How long a request waits for its answer once sent (ms, default 15,000). */
  requestTimeoutMs?: number;
  /** In a browser, follow the window's `offline`/`online` events (default true):
   * drop the socket when the network goes, wait without retrying, reconnect at
   * once when it comes back. A socket that outlives a lost network (a laptop
   * lid, a changed Wi-Fi) otherwise looks alive until TCP gives up. */
  watchNetwork?: boolean;
}

export type ConnectionState = "connecting" | "syncing" | "live" | "offline" | "closed";

export interface ClientEvents {
  /** A message, once, in order per conversation (yours included, once acked). */
  message: (m: Message) => void;
  receipt: (r: Receipt) => void;
  /** Typing started or stopped; a stop is also fired when a start expires
   * (`expires_ms`) or a message from that user arrives in that conversation. */
  typing: (t: Typing) => void;
  reaction: (r: Reaction) => void;
  presence: (p: PresenceInfo) => void;
  state: (s: ConnectionState) => void;
  /** A `sync` finished: the app holds everything up to now. */
  synced: (d: SyncDone) => void;
  /** The connection dropped (the SDK reconnects unless closed): the WebSocket
   * close code (4008 slow consumer, 1008 policy/abuse, 1001 going away, ...). */
  disconnected: (code: number, reason: string) => void;
  /** An error that answers no pending request (e.g. a refused `typing`). */
  error: (e: SwitchboardError) => void;
}

interface PendingSend {
  conversationId: Id;
  clientMsgId: string;
  body: string;
  attachment?: AttachmentRef;
  /** The attachment as the message will carry it (for the local `message` on ack). */
  carried?: Attachment;
  attempts: number;
  /** Sent on the current connection (its answer is awaited there). */
  onWire: boolean;
  retry?: ReturnType<typeof setTimeout>;
  resolve: (a: Ack) => void;
  reject: (e: SwitchboardError) => void;
}

interface PendingRequest {
  resolve: (f: ServerFrame) => void;
  reject: (e: SwitchboardError) => void;
  timer: ReturnType<typeof setTimeout>;
}

type Listener = (...args: never[]) => void;

function wsBase(url: string): string {
  return url.replace(/^http(s?):\/\//, "ws$1://").replace(/\/+$/, "");
}

let counter = 0;
/** A client_msg_id: unique per device and send (time, counter, randomness). */
export function newClientMsgId(): string {
  counter = (counter + 1) % 1_000_000;
  const rand = Math.floor(Math.random() * 2 ** 32).toString(36);
  return `${Date.now().toString(36)}-${counter.toString(36)}-${rand}`;
}

export class SwitchboardClient {
  private readonly opts: Required<Pick<ClientOptions, "requestTimeoutMs">> & ClientOptions;
  private readonly WS: WebSocketConstructor;
  private ws: WebSocketLike | null = null;
  private current: ConnectionState = "offline";
  private readonly positions = new Map<Id, number>();
  private readonly pending = new Map<string, PendingSend>();
  private readonly requests = new Map<number, PendingRequest>();
  private waiting: { go: () => void; stop: (e: SwitchboardError) => void }[] = [];
  private readonly listeners = new Map<keyof ClientEvents, Set<Listener>>();
  private readonly typingTimers = new Map<string, ReturnType<typeof setTimeout>>();
  private nextId = 1;
  private syncId = 0;
  private attempt = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private closedByApp = false;
  private started = false;
  private networkDown = false;
  /** The conversations' newest positions were read (`startAt: "latest"`). */
  private startedLatest = false;
  private unwatch: (() => void) | null = null;
  /** The user this client is logged in as (from `welcome`). */
  userId: Id | null = null;
  /** The current connection's id (from `welcome`; its top 16 bits are the
   * gateway node's `node_id`, for logs and support). */
  connectionId: Id | null = null;

  constructor(options: ClientOptions) {
    this.opts = { requestTimeoutMs: 15_000, ...options };
    const ws = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!ws) throw new Error("no WebSocket implementation: pass options.WebSocket (e.g. the `ws` package)");
    this.WS = ws;
    for (const [c, seq] of Object.entries(options.positions ?? {})) this.positions.set(c, seq);
  }

  // ---- lifecycle -------------------------------------------------------

  /** Connects (and keeps reconnecting); resolves once the first `sync` is done. */
  connect(): Promise<void> {
    const live = this.whenLive();
    if (!this.started) {
      this.started = true;
      this.watchNetwork();
      void this.open();
    }
    return live;
  }

  /** Closes for good: pending sends and requests reject with `closed`. */
  close(): void {
    this.closedByApp = true;
    this.unwatch?.();
    this.unwatch = null;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.ws?.close(1000, "closed by the app");
    this.ws = null;
    this.setState("closed");
    for (const p of this.pending.values()) {
      if (p.retry) clearTimeout(p.retry);
      p.reject(closed());
    }
    this.pending.clear();
    this.failRequests(closed());
    for (const w of this.waiting) w.stop(closed());
    this.waiting = [];
    for (const t of this.typingTimers.values()) clearTimeout(t);
    this.typingTimers.clear();
  }

  get state(): ConnectionState {
    return this.current;
  }

  /** Highest `seq` held per conversation: persist it to resume without a backlog replay. */
  getPositions(): Record<Id, number> {
    return Object.fromEntries(this.positions);
  }

  /** Sends not yet acknowledged, oldest first. */
  pendingSends(): { conversationId: Id; clientMsgId: string; body: string }[] {
    return [...this.pending.values()].map(({ conversationId, clientMsgId, body }) => ({
      conversationId,
      clientMsgId,
      body,
    }));
  }

  on<K extends keyof ClientEvents>(event: K, fn: ClientEvents[K]): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(fn as Listener);
    return () => set.delete(fn as Listener);
  }

  private emit<K extends keyof ClientEvents>(event: K, ...args: Parameters<ClientEvents[K]>): void {
    for (const fn of this.listeners.get(event) ?? []) {
      try {
        (fn as unknown as (...a: Parameters<ClientEvents[K]>) => void)(...args);
      } catch (e) {
        console.error(`switchboard: a ${event} listener threw`, e);
      }
    }
  }

  private setState(s: ConnectionState): void {
    if (this.current === s) return;
    this.current = s;
    this.emit("state", s);
  }

  private whenLive(): Promise<void> {
    if (this.current === "live") return Promise.resolve();
    if (this.closedByApp) return Promise.reject(closed());
    return new Promise((go, stop) => this.waiting.push({ go, stop }));
  }

  private async open(): Promise<void> {
    if (this.closedByApp) return;
    this.setState("connecting");
    let token: string;
    try {
      token = typeof this.opts.token === "function" ? await this.opts.token() : this.opts.token;
    } catch {
      this.scheduleReconnect();
      return;
    }
    if (this.closedByApp) return;
    const url = `${wsBase(this.opts.url)}/v1/ws?token=${encodeURIComponent(token)}`;
    let ws: WebSocketLike;
    try {
      ws = new this.WS(url, "switchboard.v1.json");
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      let f: ServerFrame;
      try {
        f = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data)) as ServerFrame;
      } catch {
        return;
      }
      this.onFrame(f);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.onClose(ev.code, ev.reason);
    };
    ws.onerror = () => {
      // A close event follows.
    };
  }

  private watchNetwork(): void {
    const win = globalThis as {
      addEventListener?: (type: string, fn: () => void) => void;
      removeEventListener?: (type: string, fn: () => void) => void;
    };
    if (this.opts.watchNetwork === false || !win.addEventListener || !win.removeEventListener) return;
    const offline = () => {
      this.networkDown = true;
      if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
      this.reconnectTimer = null;
      const ws = this.ws;
      if (!ws) return;
      // Detached first: whatever the old socket still says is not this session's.
      this.ws = null;
      ws.close(1000, "network offline");
      this.onClose(1006, "network offline");
    };
    const online = () => {
      if (!this.networkDown) return;
      this.networkDown = false;
      this.attempt = 0;
      if (!this.ws && !this.reconnectTimer && !this.closedByApp) void this.open();
    };
    win.addEventListener("offline", offline);
    win.addEventListener("online", online);
    this.unwatch = () => {
      win.removeEventListener!("offline", offline);
      win.removeEventListener!("online", online);
    };
  }

  private onClose(code: number, reason: string): void {
    this.ws = null;
    for (const p of this.pending.values()) p.onWire = false;
    this.failRequests(connectionLost());
    this.emit("disconnected", code, reason);
    if (this.closedByApp) return;
    this.setState("offline");
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    // While the network is down, the `online` event reconnects.
    if (this.closedByApp || this.reconnectTimer || this.networkDown) return;
    const initial = this.opts.backoff?.initialMs ?? 250;
    const max = this.opts.backoff?.maxMs ?? 10_000;
    const ceiling = Math.min(max, initial * 2 ** Math.min(this.attempt, 20));
    this.attempt += 1;
    // Full jitter: clients dropped together do not come back together.
    const delay = Math.random() * ceiling;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      void this.open();
    }, delay);
  }

  private failRequests(e: SwitchboardError): void {
    for (const r of this.requests.values()) {
      clearTimeout(r.timer);
      r.reject(e);
    }
    this.requests.clear();
  }

  private write(frame: Record<string, unknown>): void {
    this.ws?.send(JSON.stringify(frame));
  }

  // ---- incoming --------------------------------------------------------

  private onFrame(f: ServerFrame): void {
    switch (f.type) {
      case "welcome": {
        const w = f as unknown as Welcome;
        this.userId = String(w.user_id);
        this.connectionId = String(w.connection_id);
        this.setState("syncing");
        if (this.opts.startAt === "latest" && !this.startedLatest && this.positions.size === 0) {
          void this.startLatest();
          return;
        }
        this.sendSync();
        return;
      }
      case "sync_done":
        if (f.id === this.syncId) this.onSynced(f as unknown as SyncDone);
        return;
      case "message":
        this.deliver(f.message as Message);
        return;
      case "ack":
        this.onAck(f as unknown as Ack);
        return;
      case "typing":
        this.onTyping(f as unknown as Typing);
        return;
      case "receipt":
        this.emit("receipt", f as unknown as Receipt);
        return;
      case "reaction":
        this.emit("reaction", f as unknown as Reaction);
        return;
      case "presence":
        this.emit("presence", f.presence as PresenceInfo);
        return;
      case "error":
        this.onError(f);
        return;
      default: {
        const r = f.id ? this.requests.get(f.id) : undefined;
        if (r) {
          this.requests.delete(f.id as number);
          clearTimeout(r.timer);
          r.resolve(f);
        }
      }
    }
  }

  private sendSync(): void {
    this.syncId = this.nextId++;
    const positions = [...this.positions].map(([conversation_id, seq]) => ({ conversation_id, seq }));
    this.write({ type: "sync", id: this.syncId, positions });
  }

  /** Before the first sync of a new device: every conversation's newest position
   * (`list_conversations`, page by page; the server holds events until `sync`). */
  private async startLatest(): Promise<void> {
    const ws = this.ws;
    try {
      let cursor: string | undefined;
      do {
        const page = (await this.rawRequest("list_conversations", { limit: 100, ...(cursor ? { cursor } : {}) })) as unknown as ConversationList;
        for (const item of page.items) {
          if (!this.positions.has(item.conversation_id)) this.positions.set(item.conversation_id, item.last_seq);
        }
        cursor = page.next_cursor;
      } while (cursor);
    } catch {
      // The connection dropped meanwhile: the next one starts over.
      return;
    }
    if (this.ws !== ws) return;
    this.startedLatest = true;
    this.sendSync();
  }

  private onSynced(d: SyncDone): void {
    this.attempt = 0;
    this.setState("live");
    // Sends still unacknowledged go again, oldest first, with their own ids:
    // the server stores each once and acks the stored one.
    for (const p of this.pending.values()) {
      if (!p.retry) this.transmit(p);
    }
    this.emit("synced", d);
    const waiting = this.waiting;
    this.waiting = [];
    for (const w of waiting) w.go();
  }

  /** Shows a message once, in order: anything at or below the position held is a repeat. */
  private deliver(m: Message): void {
    const held = this.positions.get(m.conversation_id);
    if (held !== undefined && m.seq <= held) return;
    this.positions.set(m.conversation_id, m.seq);
    // A replay of our own send whose ack was lost with the connection.
    if (m.sender_id === this.userId && m.client_msg_id) {
      const p = this.pending.get(m.client_msg_id);
      if (p && p.conversationId === m.conversation_id) {
        this.settle(p);
        p.resolve({ conversation_id: m.conversation_id, client_msg_id: m.client_msg_id, seq: m.seq, ts_ms: m.ts_ms });
      }
    }
    if (m.kind === "text") this.stopTyping(m.conversation_id, m.sender_id);
    this.emit("message", m);
  }

  private onAck(a: Ack): void {
    const p = this.pending.get(a.client_msg_id);
    if (!p || p.conversationId !== a.conversation_id) return;
    this.settle(p);
    p.resolve(a);
    this.deliver({
      conversation_id: a.conversation_id,
      seq: a.seq,
      ts_ms: a.ts_ms,
      sender_id: this.userId ?? "",
      client_msg_id: a.client_msg_id,
      kind: "text",
      body: p.body,
      ...(p.carried ? { attachment: p.carried } : {}),
    });
  }

  private settle(p: PendingSend): void {
    if (p.retry) clearTimeout(p.retry);
    this.pending.delete(p.clientMsgId);
  }

  private onError(f: ServerFrame): void {
    const e = new SwitchboardError(Number(f.code ?? 0), String(f.name ?? "error"), String(f.message ?? ""));
    const cmid = typeof f.client_msg_id === "string" ? f.client_msg_id : "";
    const p = cmid ? this.pending.get(cmid) : undefined;
    if (p) {
      if (!e.retryable) {
        this.settle(p);
        p.reject(e);
        return;
      }
      // Not stored: sent again after a backoff (or after the next sync, if the
      // connection drops meanwhile).
      p.onWire = false;
      p.attempts += 1;
      const delay = Math.random() * Math.min(30_000, 500 * 2 ** Math.min(p.attempts, 16));
      p.retry = setTimeout(() => {
        p.retry = undefined;
        if (this.current === "live" && this.pending.get(p.clientMsgId) === p) this.transmit(p);
      }, delay);
      return;
    }
    const r = f.id ? this.requests.get(f.id) : undefined;
    if (r) {
      this.requests.delete(f.id as number);
      clearTimeout(r.timer);
      r.reject(e);
      return;
    }
    if (f.id === this.syncId && this.syncId !== 0) {
      // A position the server does not know (bad_cursor): sync again without them.
      this.positions.clear();
      this.syncId = this.nextId++;
      this.write({ type: "sync", id: this.syncId, positions: [] });
    }
    this.emit("error", e);
  }

  private onTyping(t: Typing): void {
    const key = `${t.conversation_id}/${t.user_id}`;
    const old = this.typingTimers.get(key);
    if (old) clearTimeout(old);
    this.typingTimers.delete(key);
    if (t.typing) {
      this.typingTimers.set(
        key,
        setTimeout(() => this.stopTyping(t.conversation_id, t.user_id), t.expires_ms ?? 5_000),
      );
    }
    this.emit("typing", t);
  }

  private stopTyping(conversationId: Id, userId: Id): void {
    const key = `${conversationId}/${userId}`;
    const timer = this.typingTimers.get(key);
    if (!timer) return;
    clearTimeout(timer);
    this.typingTimers.delete(key);
    this.emit("typing", { conversation_id: conversationId, user_id: userId, typing: false, expires_ms: 0 });
  }

  // ---- sending ---------------------------------------------------------

  /** Sends a text message; resolves with its `ack` (durable, with its `seq`). */
  send(conversationId: Id, body: string, clientMsgId: string = newClientMsgId()): Promise<Ack> {
    return this.queueSend({ conversationId, clientMsgId, body });
  }

  private queueSend(s: {
    conversationId: Id;
    clientMsgId: string;
    body: string;
    attachment?: AttachmentRef;
    carried?: Attachment;
  }): Promise<Ack> {
    if (this.closedByApp) return Promise.reject(closed());
    const existing = this.pending.get(s.clientMsgId);
    if (existing) return Promise.reject(new Error(`a send with client_msg_id ${s.clientMsgId} is pending`));
    return new Promise<Ack>((resolve, reject) => {
      const p: PendingSend = { ...s, attempts: 0, onWire: false, resolve, reject };
      this.pending.set(s.clientMsgId, p);
      if (this.current === "live") this.transmit(p);
    });
  }

  private transmit(p: PendingSend): void {
    p.onWire = true;
    this.write({
      type: "send",
      conversation_id: p.conversationId,
      client_msg_id: p.clientMsgId,
      body: p.body,
      ...(p.attachment ? { attachment: p.attachment } : {}),
    });
  }

  private async currentToken(): Promise<string> {
    return typeof this.opts.token === "function" ? await this.opts.token() : this.opts.token;
  }

  /**
   * Sends a file: asks for an upload slot, uploads the bytes straight to the
   * object store (never through the WebSocket), then sends a message naming it,
   * with `caption` as its body. Resolves with the message's `ack`. Upload
   * failures reject with the HTTP error's code (e.g. `attachment_too_large`,
   * `media_type_not_allowed`, `upload_budget_exceeded`); the message itself is
   * queued and retried like any send once the upload is done.
   */
  async sendFile(
    conversationId: Id,
    file: Blob | ArrayBuffer | Uint8Array,
    options: {
      caption?: string;
      fileName?: string;
      mediaType?: string;
      width?: number;
      height?: number;
      preview?: string;
      onProgress?: (sent: number, total: number) => void;
      clientMsgId?: string;
    } = {},
  ): Promise<Ack> {
    const blob = typeof Blob !== "undefined" && file instanceof Blob ? file : null;
    const bytes = blob
      ? new Uint8Array(await blob.arrayBuffer())
      : file instanceof Uint8Array
        ? file
        : new Uint8Array(file as ArrayBuffer);
    const fileName = options.fileName ?? (blob as { name?: string } | null)?.name ?? "file";
    const mediaType = (options.mediaType ?? (blob?.type || "application/octet-stream")).toLowerCase();
    const sha256 = await sha256Hex(bytes);
    const token = await this.currentToken();
    const slot = await requestUploadSlot(this.opts.url, token, {
      conversation_id: conversationId,
      size: bytes.length,
      media_type: mediaType,
      sha256,
      file_name: fileName,
    });
    await upload(this.opts.url, slot, bytes, options.onProgress);
    const ref: AttachmentRef = { attachment_id: slot.attachment_id };
    if (options.width) ref.width = options.width;
    if (options.height) ref.height = options.height;
    if (options.preview) ref.preview = options.preview;
    return this.queueSend({
      conversationId,
      clientMsgId: options.clientMsgId ?? newClientMsgId(),
      body: options.caption ?? "",
      attachment: ref,
      carried: { ...ref, file_name: fileName, media_type: mediaType, size: bytes.length, sha256 },
    });
  }

  /** A download URL for an attachment (for members of its conversation; it expires). */
  async downloadUrl(attachment: Attachment | string): Promise<string> {
    const id = typeof attachment === "string" ? attachment : attachment.attachment_id;
    return (await downloadUrl(this.opts.url, await this.currentToken(), id)).url;
  }

  /** A request answered by a frame with its `id`; waits for a live connection first. */
  private async request(type: string, fields: Record<string, unknown> = {}): Promise<ServerFrame> {
    await this.whenLive();
    return this.rawRequest(type, fields);
  }

  /** A request on the current connection, live or not. */
  private rawRequest(type: string, fields: Record<string, unknown>): Promise<ServerFrame> {
    return new Promise<ServerFrame>((resolve, reject) => {
      const id = this.nextId++;
      const timer = setTimeout(() => {
        this.requests.delete(id);
        reject(new SwitchboardError(0, "timeout", `no answer to ${type} in ${this.opts.requestTimeoutMs} ms`));
      }, this.opts.requestTimeoutMs);
      this.requests.set(id, { resolve, reject, timer });
      this.write({ type, id, ...fields });
    });
  }

  /** A request with no answer on success (its error, if any, fires `error`). */
  private notify(type: string, fields: Record<string, unknown>): void {
    if (this.current !== "live") return;
    this.write({ type, id: this.nextId++, ...fields });
  }

  // ---- the protocol's requests ----------------------------------------

  async createDirect(userId: Id): Promise<Conversation> {
    return (await this.request("create_direct", { user_id: userId })).conversation as Conversation;
  }

  async createGroup(title: string, members: Id[]): Promise<Conversation> {
    return (await this.request("create_group", { title, members })).conversation as Conversation;
  }

  async addMembers(conversationId: Id, userIds: Id[]): Promise<Conversation> {
    const f = await this.request("add_members", { conversation_id: conversationId, user_ids: userIds });
    return f.conversation as Conversation;
  }

  async removeMember(conversationId: Id, userId: Id): Promise<Conversation> {
    const f = await this.request("remove_member", { conversation_id: conversationId, user_id: userId });
    return f.conversation as Conversation;
  }

  async leave(conversationId: Id): Promise<void> {
    await this.request("leave", { conversation_id: conversationId });
  }

  async setRole(conversationId: Id, userId: Id, role: Role): Promise<Conversation> {
    const f = await this.request("set_role", { conversation_id: conversationId, user_id: userId, role });
    return f.conversation as Conversation;
  }

  async getConversation(conversationId: Id): Promise<Conversation> {
    return (await this.request("get_conversation", { conversation_id: conversationId })).conversation as Conversation;
  }

  /** A page of history: newest first by default, `before` a position (older, newest
   * first) or `after` one (newer, oldest first). */
  async history(
    conversationId: Id,
    page: { before?: number; after?: number; limit?: number } = {},
  ): Promise<HistoryPage> {
    const f = await this.request("history", { conversation_id: conversationId, ...page });
    return f as unknown as HistoryPage;
  }

  async listConversations(page: { limit?: number; cursor?: string } = {}): Promise<ConversationList> {
    return (await this.request("list_conversations", page)) as unknown as ConversationList;
  }

  /** This device holds everything up to `seq` (once per batch received). */
  markDelivered(conversationId: Id, seq: number): void {
    this.notify("mark_delivered", { conversation_id: conversationId, seq });
  }

  /** The user has seen everything up to `seq`: clears unread and sends a seen receipt. */
  markRead(conversationId: Id, seq: number): void {
    this.notify("mark_read", { conversation_id: conversationId, seq });
  }

  async getReceipts(conversationId: Id): Promise<Receipts> {
    return (await this.request("get_receipts", { conversation_id: conversationId })) as unknown as Receipts;
  }

  /** Typing started (send again every 3 s while it goes on) or stopped. */
  typing(conversationId: Id, typing: boolean): void {
    this.notify("typing", { conversation_id: conversationId, typing });
  }

  async edit(conversationId: Id, seq: number, body: string): Promise<void> {
    await this.request("edit", { conversation_id: conversationId, seq, body });
  }

  async delete(conversationId: Id, seq: number): Promise<void> {
    await this.request("delete", { conversation_id: conversationId, seq });
  }

  /** Sets your reaction to a message (`""` removes it). */
  async react(conversationId: Id, seq: number, emoji: string): Promise<void> {
    await this.request("react", { conversation_id: conversationId, seq, emoji });
  }

  async mute(conversationId: Id, muted: boolean): Promise<void> {
    await this.request("mute", { conversation_id: conversationId, muted });
  }

  async getPresence(userIds: Id[]): Promise<PresenceInfo[]> {
    return (await this.request("get_presence", { user_ids: userIds })).users as PresenceInfo[];
  }

  async setPrivacy(hideLastSeen: boolean): Promise<void> {
    await this.request("set_privacy", { hide_last_seen: hideLastSeen });
  }

  async ping(): Promise<void> {
    await this.request("ping");
  }
}
