// The web chat: one page on the SDK. State lives in the maps below; every
// change re-renders the panel it touches (plain DOM, text set with
// textContent only, so no message can inject markup).

import {
  type Attachment,
  type ConnectionState,
  type Conversation,
  type ConversationItem,
  type Id,
  type Message,
  type PresenceInfo,
  SwitchboardClient,
  SwitchboardError,
  findUser,
  getUsers,
  login,
  register,
} from "@switchboard/client";

const origin = location.origin;
const PAGE = 30;
const REACTIONS = ["👍", "❤️", "😂", "😮"];

interface ConvState {
  item: ConversationItem;
  members: Conversation["members"] | null;
  /** Loaded messages by seq (history pages, replays and live ones). */
  messages: Map<number, Message>;
  /** Lowest seq loaded, and whether older ones remain on the server. */
  oldest: number;
  hasMore: boolean;
  loaded: boolean;
  receipts: Map<Id, { delivered: number; read: number }>;
  typing: Set<Id>;
}

interface Local {
  clientMsgId: string;
  body: string;
  failed?: string;
  /** A file being sent: its name and how much is uploaded. */
  file?: { name: string; sent: number; total: number };
}

let client: SwitchboardClient | null = null;
let me: Id = "";
let token = "";
let connState: ConnectionState = "offline";
const convs = new Map<Id, ConvState>();
const names = new Map<Id, string>();
const presence = new Map<Id, PresenceInfo>();
/** Sends not yet acknowledged, per conversation (shown as "sending"). */
const outbox = new Map<Id, Local[]>();
let openId: Id | null = null;
let editing: { conv: Id; seq: number } | null = null;
let showMembers = false;
let notice = "";

// ---- small DOM helpers ----------------------------------------------------

type Child = Node | string | null | undefined | false;

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | ((e: Event) => void)> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (typeof v === "function") el.addEventListener(k, v);
    else el.setAttribute(k, v);
  }
  for (const c of children) if (c) el.append(typeof c === "string" ? document.createTextNode(c) : c);
  return el;
}

const $ = (id: string) => document.getElementById(id);

/** The children that are there (conditional ones are `false` when absent). */
function present(...children: Child[]): (Node | string)[] {
  return children.filter((c): c is Node | string => !!c);
}

function say(e: unknown): void {
  notice = e instanceof Error ? e.message : String(e);
  renderNotice();
}

function nameOf(id: Id): string {
  return id === me ? "you" : (names.get(id) ?? `user ${id.slice(-4)}`);
}

async function learnNames(ids: Id[]): Promise<void> {
  const unknown = [...new Set(ids)].filter((id) => id && !names.has(id));
  for (let i = 0; i < unknown.length; i += 100) {
    for (const u of await getUsers(origin, token, unknown.slice(i, i + 100))) names.set(u.user_id, u.username);
  }
}

function title(c: ConvState): string {
  if (c.item.kind === "group") return c.item.title;
  const other = c.members?.find((m) => m.user_id !== me);
  return other ? nameOf(other.user_id) : "direct chat";
}

function peer(c: ConvState): Id | null {
  if (c.item.kind !== "direct") return null;
  return c.members?.find((m) => m.user_id !== me)?.user_id ?? null;
}

function time(ms: number): string {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function preview(m: Message | undefined): string {
  if (!m) return "";
  switch (m.kind) {
    case "text":
      return `${m.sender_id === me ? "You: " : ""}${m.attachment ? `📎 ${m.attachment.file_name} ` : ""}${m.body}`;
    case "deleted":
    case "delete":
      return "message deleted";
    case "edit":
      return `edited: ${m.body}`;
    default:
      return system(m);
  }
}

function system(m: Message): string {
  const who = nameOf(m.sender_id);
  const whom = m.target_user_id ? nameOf(m.target_user_id) : "";
  switch (m.kind) {
    case "group_created":
      return `${who} created the group “${m.body}”`;
    case "member_added":
      return `${who} added ${whom}`;
    case "member_removed":
      return `${who} removed ${whom}`;
    case "member_left":
      return `${whom || who} left`;
    case "role_changed":
      return `${who} made ${whom} ${m.role ?? ""}`;
    default:
      return m.kind;
  }
}

// ---- login ------------------------------------------------------------------

function renderLogin(): void {
  const user = h("input", { id: "username", placeholder: "username", autocomplete: "username" });
  const pass = h("input", { id: "password", placeholder: "password", type: "password", autocomplete: "current-password" });
  const status = h("p", { id: "login-error", class: "error" });
  const go = async (create: boolean) => {
    status.textContent = "";
    try {
      if (create) await register(origin, user.value, pass.value);
      const t = await login(origin, user.value, pass.value);
      sessionStorage.setItem("switchboard", JSON.stringify({ token: t.token, user_id: t.user_id, username: user.value }));
      start(t.token, t.user_id, user.value);
    } catch (e) {
      status.textContent = e instanceof Error ? e.message : String(e);
    }
  };
  const form = h(
    "form",
    { class: "login", submit: (e) => (e.preventDefault(), void go(false)) },
    h("h1", {}, "Switchboard"),
    user,
    pass,
    h("div", { class: "row" }, h("button", { id: "login", type: "submit" }, "Log in"),
      h("button", { id: "register", type: "button", click: () => void go(true) }, "Register")),
    status,
  );
  $("root")!.replaceChildren(form);
  user.focus();
}

// ---- the session ------------------------------------------------------------

function positionsKey(): string {
  return `switchboard:positions:${me}`;
}

function start(t: string, userId: Id, username: string): void {
  token = t;
  me = userId;
  names.set(me, username);
  renderShell();
  // Positions survive a reload, so only what is new is replayed.
  const saved = JSON.parse(localStorage.getItem(positionsKey()) ?? "{}") as Record<Id, number>;
  // A new device starts at the latest messages; opening a conversation pages its history.
  const c = new SwitchboardClient({ url: origin, token, positions: saved, startAt: "latest" });
  client = c;
  c.on("state", (s) => {
    connState = s;
    renderStatus();
  });
  c.on("message", onMessage);
  c.on("synced", () => void refresh());
  c.on("receipt", (r) => {
    const conv = convs.get(r.conversation_id);
    if (!conv) return;
    conv.receipts.set(r.user_id, { delivered: r.delivered_seq, read: r.read_seq });
    if (r.user_id === me) {
      conv.item.read_seq = Math.max(conv.item.read_seq, r.read_seq);
      conv.item.unread = Math.max(0, conv.item.last_seq - conv.item.read_seq);
      renderList();
    }
    if (r.conversation_id === openId) renderMessages(false);
  });
  c.on("typing", (t) => {
    const conv = convs.get(t.conversation_id);
    if (!conv) return;
    if (t.typing) conv.typing.add(t.user_id);
    else conv.typing.delete(t.user_id);
    if (t.conversation_id === openId) renderTyping();
  });
  c.on("reaction", (r) => {
    const m = convs.get(r.conversation_id)?.messages.get(r.seq);
    if (!m) return;
    m.reactions = r.reactions;
    if (r.user_id === me) m.my_reaction = r.emoji || undefined;
    if (r.conversation_id === openId) renderMessages(false);
  });
  c.on("presence", (p) => {
    presence.set(p.user_id, p);
    renderList();
    renderHeader();
  });
  c.on("error", say);
  c.connect().catch(say);
}

/** After every (re)connect: the list, receipts and presence are state, not replayed. */
async function refresh(): Promise<void> {
  const c = client!;
  try {
    const items: ConversationItem[] = [];
    let cursor: string | undefined;
    do {
      const page = await c.listConversations({ limit: 100, cursor });
      items.push(...page.items);
      cursor = page.next_cursor;
    } while (cursor && items.length < 500);
    for (const item of items) {
      const conv = convs.get(item.conversation_id);
      if (conv) conv.item = item;
      else convs.set(item.conversation_id, blank(item));
    }
    await Promise.all(items.filter((i) => !convs.get(i.conversation_id)!.members).map((i) => loadMembers(i.conversation_id)));
    const people = [...convs.values()].flatMap((cv) => (cv.members ?? []).map((m) => m.user_id));
    await learnNames([...people, ...items.map((i) => i.last_message?.sender_id ?? "")]);
    const direct = [...convs.values()].map(peer).filter((p): p is Id => !!p);
    if (direct.length) for (const p of await c.getPresence(direct.slice(0, 100))) presence.set(p.user_id, p);
    renderList();
    if (openId) await openConversation(openId, true);
  } catch (e) {
    say(e);
  }
}

function blank(item: ConversationItem): ConvState {
  return {
    item,
    members: null,
    messages: new Map(),
    oldest: item.last_seq + 1,
    hasMore: item.last_seq > 0,
    loaded: false,
    receipts: new Map(),
    typing: new Set(),
  };
}

async function loadMembers(id: Id): Promise<void> {
  const conv = convs.get(id);
  if (!conv) return;
  const full = await client!.getConversation(id);
  conv.members = full.members;
  conv.item.title = full.title;
}

function onMessage(m: Message): void {
  localStorage.setItem(positionsKey(), JSON.stringify(client!.getPositions()));
  let conv = convs.get(m.conversation_id);
  if (!conv) {
    // A conversation we did not know: someone started it, or added us.
    conv = blank({
      conversation_id: m.conversation_id,
      kind: m.kind === "group_created" ? "group" : "direct",
      title: m.kind === "group_created" ? m.body : "",
      last_seq: 0,
      last_ts_ms: m.ts_ms,
      read_seq: 0,
      unread: 0,
      muted: false,
    });
    convs.set(m.conversation_id, conv);
    void loadMembers(m.conversation_id)
      .then(() => learnNames((conv!.members ?? []).map((x) => x.user_id)))
      .then(() => (renderList(), renderHeader()))
      .catch(say);
  }
  const item = conv.item;
  if (m.seq > item.last_seq) {
    item.last_seq = m.seq;
    item.last_ts_ms = m.ts_ms;
    item.last_message = m;
    if (m.sender_id === me) item.read_seq = m.seq;
    item.unread = Math.max(0, item.last_seq - item.read_seq);
  }
  apply(conv, m);
  if (m.sender_id === me && m.client_msg_id) {
    const box = outbox.get(m.conversation_id);
    if (box) outbox.set(m.conversation_id, box.filter((l) => l.clientMsgId !== m.client_msg_id));
  }
  if (m.kind !== "text") void learnNames([m.sender_id, m.target_user_id ?? ""]);
  if (m.kind.startsWith("member") || m.kind === "role_changed") void loadMembers(m.conversation_id).then(renderMembers);
  else if (!names.has(m.sender_id)) void learnNames([m.sender_id]).then(() => renderMessages(false));
  acknowledge(m.conversation_id);
  renderList();
  if (m.conversation_id === openId) renderMessages(true);
}

/** Folds a message into the loaded ones: edits and deletes rewrite their target. */
function apply(conv: ConvState, m: Message): void {
  if (m.kind === "edit" || m.kind === "delete") {
    const target = conv.messages.get(m.target_seq ?? 0);
    if (target && m.kind === "edit") {
      target.body = m.body;
      target.edited_ms = m.ts_ms;
    } else if (target) {
      target.kind = "deleted";
      target.body = "";
      target.reactions = undefined;
      target.my_reaction = undefined;
    }
    return;
  }
  // Kept only once the conversation has been opened (its newest page loaded):
  // what is loaded stays contiguous, and a replay to a new device is not all
  // held in memory (opening a conversation pages its history instead).
  if (conv.loaded) conv.messages.set(m.seq, m);
}

// Receipts: delivered once per batch, seen while the conversation is on screen.
const toAcknowledge = new Set<Id>();
function acknowledge(id: Id): void {
  if (toAcknowledge.size === 0) queueMicrotask(flushAcknowledgements);
  toAcknowledge.add(id);
}
function flushAcknowledgements(): void {
  for (const id of toAcknowledge) {
    const conv = convs.get(id);
    if (!conv || !client) continue;
    const last = conv.item.last_seq;
    if (id === openId && document.visibilityState === "visible") markSeen(conv);
    else if ((conv.receipts.get(me)?.delivered ?? 0) < last) client.markDelivered(id, last);
  }
  toAcknowledge.clear();
}

function markSeen(conv: ConvState): void {
  const last = conv.item.last_seq;
  if (last > conv.item.read_seq && client?.state === "live") {
    client.markRead(conv.item.conversation_id, last);
    conv.item.read_seq = last;
    conv.item.unread = 0;
    renderList();
  }
}

document.addEventListener("visibilitychange", () => {
  const conv = openId ? convs.get(openId) : undefined;
  if (conv && document.visibilityState === "visible") markSeen(conv);
});

// ---- opening a conversation, paging back -----------------------------------

async function openConversation(id: Id, again = false): Promise<void> {
  const c = client!;
  const conv = convs.get(id);
  if (!conv) return;
  if (openId !== id) {
    editing = null;
    showMembers = false;
  }
  openId = id;
  if (!conv.members) await loadMembers(id);
  await learnNames((conv.members ?? []).map((m) => m.user_id));
  // The newest page: on first open, and again after a reconnect to refresh
  // reactions and edits of what is on screen.
  if (!conv.loaded || again) {
    const page = await c.history(id, { limit: PAGE });
    for (const m of page.messages) conv.messages.set(m.seq, m);
    const lowest = page.messages.length ? page.messages[page.messages.length - 1].seq : conv.item.last_seq + 1;
    if (!conv.loaded) {
      conv.oldest = lowest;
      conv.hasMore = page.has_more;
    }
    conv.loaded = true;
    await learnNames(page.messages.map((m) => m.sender_id));
  }
  const receipts = await c.getReceipts(id);
  for (const r of receipts.members) conv.receipts.set(r.user_id, { delivered: r.delivered_seq, read: r.read_seq });
  const p = peer(conv);
  if (p) for (const info of await c.getPresence([p])) presence.set(info.user_id, info);
  renderList();
  renderConversation();
  if (document.visibilityState === "visible") markSeen(conv);
}

async function loadOlder(): Promise<void> {
  const conv = openId ? convs.get(openId) : undefined;
  if (!conv || !conv.hasMore || !client) return;
  const box = $("messages");
  const before = box ? box.scrollHeight - box.scrollTop : 0;
  const page = await client.history(conv.item.conversation_id, { before: conv.oldest, limit: PAGE });
  for (const m of page.messages) conv.messages.set(m.seq, m);
  if (page.messages.length) conv.oldest = page.messages[page.messages.length - 1].seq;
  conv.hasMore = page.has_more;
  await learnNames(page.messages.map((m) => m.sender_id));
  renderMessages(false);
  // Keep the message the user was looking at in place.
  if (box) box.scrollTop = box.scrollHeight - before;
}

// ---- actions ------------------------------------------------------------------

function send(text: string): void {
  const c = client;
  if (!c || !openId || !text.trim()) return;
  const conv = openId;
  if (editing) {
    const { conv: ec, seq } = editing;
    editing = null;
    c.edit(ec, seq, text).catch(say);
    renderComposer();
    return;
  }
  const id = `web-${crypto.randomUUID()}`;
  const local: Local = { clientMsgId: id, body: text };
  outbox.set(conv, [...(outbox.get(conv) ?? []), local]);
  c.send(conv, text, id).catch((e: SwitchboardError) => {
    local.failed = e.message;
    if (conv === openId) renderMessages(false);
  });
  renderMessages(true);
}

async function startDirect(username: string): Promise<void> {
  const c = client!;
  const u = await findUser(origin, token, username.trim());
  names.set(u.user_id, u.username);
  const conv = await c.createDirect(u.user_id);
  adopt(conv);
  await openConversation(conv.conversation_id);
}

async function createGroup(groupTitle: string, usernames: string): Promise<void> {
  const c = client!;
  const ids: Id[] = [];
  for (const n of usernames.split(/[\s,]+/).filter(Boolean)) {
    const u = await findUser(origin, token, n);
    names.set(u.user_id, u.username);
    ids.push(u.user_id);
  }
  const conv = await c.createGroup(groupTitle.trim(), ids);
  adopt(conv);
  await openConversation(conv.conversation_id);
}

function adopt(conv: Conversation): void {
  const known = convs.get(conv.conversation_id);
  if (known) {
    known.members = conv.members;
    return;
  }
  const state = blank({
    conversation_id: conv.conversation_id,
    kind: conv.kind,
    title: conv.title,
    last_seq: conv.last_seq,
    last_ts_ms: conv.last_ts_ms,
    read_seq: conv.last_seq,
    unread: 0,
    muted: false,
  });
  state.members = conv.members;
  convs.set(conv.conversation_id, state);
}

// Typing: `true` at most every 3 s while the user types (the protocol's
// refresh interval, well inside the typing budget of 2/s), `false` when the
// composer is emptied without sending. A sent message clears it on the other
// side by itself.
let typingSent = 0;
let typingOn = false;
function onTypingInput(value: string): void {
  if (!client || !openId) return;
  const now = Date.now();
  if (value && now - typingSent > 3_000) {
    typingSent = now;
    typingOn = true;
    client.typing(openId, true);
  } else if (!value && typingOn) {
    typingOn = false;
    client.typing(openId, false);
  }
}

// ---- attachments ----------------------------------------------------------------

/** Download URLs by attachment id, reused until shortly before they expire. */
const urls = new Map<string, { url: string; until: number }>();
const asked = new Set<string>();

/** The download URL if known; otherwise asks for it and fills in the elements
 * showing that attachment when it comes. */
function urlOf(a: Attachment): string | null {
  const hit = urls.get(a.attachment_id);
  if (hit && hit.until > Date.now()) return hit.url;
  if (!asked.has(a.attachment_id) && client) {
    asked.add(a.attachment_id);
    client
      .downloadUrl(a)
      .then((url) => {
        // URLs last 15 minutes by default: reuse one for 10.
        urls.set(a.attachment_id, { url, until: Date.now() + 10 * 60_000 });
        for (const el of document.querySelectorAll<HTMLElement>(`[data-attachment="${a.attachment_id}"]`)) {
          if (el instanceof HTMLImageElement) el.src = url;
          else if (el instanceof HTMLAnchorElement) el.href = url;
        }
      })
      .catch(say)
      .finally(() => asked.delete(a.attachment_id));
  }
  return null;
}

function size(n: number): string {
  return n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(0)} KB` : `${(n / (1 << 20)).toFixed(1)} MB`;
}

function attachmentView(a: Attachment): HTMLElement {
  const url = urlOf(a);
  if (a.media_type.startsWith("image/")) {
    const img = h("img", { class: "attachment", alt: a.file_name, "data-attachment": a.attachment_id });
    if (a.width && a.height) img.style.aspectRatio = `${a.width} / ${a.height}`;
    const src = url ?? a.preview;
    if (src) img.src = src;
    return img;
  }
  const link = h("a", { class: "file", download: a.file_name, "data-attachment": a.attachment_id }, `📄 ${a.file_name}`);
  if (url) link.href = url;
  return h("span", { class: "file-row" }, link, h("span", { class: "meta" }, ` ${size(a.size)}`));
}

/** Width, height and a tiny inline preview (≤ 8 KiB) of an image file. */
async function describeImage(file: File): Promise<{ width?: number; height?: number; preview?: string }> {
  if (!file.type.startsWith("image/")) return {};
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(1, 48 / Math.max(bitmap.width, bitmap.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    canvas.getContext("2d")?.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const preview = canvas.toDataURL("image/jpeg", 0.6);
    return { width: bitmap.width, height: bitmap.height, ...(preview.length <= 8192 ? { preview } : {}) };
  } catch {
    return {};
  }
}

function sendFiles(files: FileList | File[]): void {
  const c = client;
  const conv = openId;
  if (!c || !conv) return;
  for (const file of files) {
    const id = `web-${crypto.randomUUID()}`;
    const local: Local = { clientMsgId: id, body: "", file: { name: file.name, sent: 0, total: file.size } };
    outbox.set(conv, [...(outbox.get(conv) ?? []), local]);
    void describeImage(file)
      .then((shape) =>
        c.sendFile(conv, file, {
          fileName: file.name,
          mediaType: file.type || "application/octet-stream",
          clientMsgId: id,
          ...shape,
          onProgress: (sent) => {
            local.file!.sent = sent;
            if (conv === openId) renderMessages(false);
          },
        }),
      )
      .catch((e: Error) => {
        local.failed = e.message;
        if (conv === openId) renderMessages(false);
      });
  }
  renderMessages(true);
}

// ---- rendering ------------------------------------------------------------------

function renderShell(): void {
  const newChat = h("input", { id: "new-chat", placeholder: "username" });
  const groupTitle = h("input", { id: "group-title", placeholder: "group name" });
  const groupMembers = h("input", { id: "group-members", placeholder: "usernames, comma-separated" });
  $("root")!.replaceChildren(
    h(
      "div",
      { class: "app" },
      h(
        "aside",
        {},
        h("header", {}, h("strong", { id: "me" }, names.get(me) ?? ""), h("span", { id: "status", class: "status" })),
        h(
          "form",
          { class: "row", submit: (e) => (e.preventDefault(), void startDirect(newChat.value).then(() => (newChat.value = "")).catch(say)) },
          newChat,
          h("button", { id: "start-chat", type: "submit" }, "Chat"),
        ),
        h(
          "details",
          {},
          h("summary", {}, "New group"),
          h(
            "form",
            {
              class: "col",
              submit: (e) => (e.preventDefault(), void createGroup(groupTitle.value, groupMembers.value).catch(say)),
            },
            groupTitle,
            groupMembers,
            h("button", { id: "create-group", type: "submit" }, "Create group"),
          ),
        ),
        h("ul", { id: "conversations" }),
        h("p", { id: "notice", class: "error" }),
      ),
      h("main", { id: "conversation" }, h("p", { class: "empty" }, "Pick a conversation, or start one.")),
    ),
  );
  renderStatus();
}

function renderNotice(): void {
  const el = $("notice");
  if (el) el.textContent = notice;
}

function renderStatus(): void {
  const el = $("status");
  if (!el) return;
  el.textContent = connState === "live" ? "online" : connState;
  el.dataset.state = connState;
}

function renderList(): void {
  const ul = $("conversations");
  if (!ul) return;
  const items = [...convs.values()].sort((a, b) => b.item.last_ts_ms - a.item.last_ts_ms);
  ul.replaceChildren(
    ...items.map((conv) => {
      const p = peer(conv);
      const online = p ? presence.get(p)?.online : undefined;
      return h(
        "li",
        {
          class: conv.item.conversation_id === openId ? "conv open" : "conv",
          "data-conversation": conv.item.conversation_id,
          click: () => void openConversation(conv.item.conversation_id).catch(say),
        },
        h("span", { class: online ? "dot on" : "dot" }),
        h("span", { class: "title" }, title(conv)),
        conv.item.unread > 0 && h("span", { class: "unread" }, String(conv.item.unread)),
        h("span", { class: "preview" }, preview(conv.item.last_message)),
      );
    }),
  );
}

function renderConversation(): void {
  const main = $("conversation");
  const conv = openId ? convs.get(openId) : undefined;
  if (!main || !conv) return;
  const input = h("textarea", { id: "composer", rows: "2", placeholder: "Message" });
  input.addEventListener("input", () => onTypingInput(input.value));
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      const text = input.value;
      input.value = "";
      typingOn = false;
      send(text);
    } else if (e.key === "Escape" && editing) {
      editing = null;
      input.value = "";
      renderComposer();
    }
  });
  const picker = h("input", { id: "file", type: "file", multiple: "", hidden: "" });
  picker.addEventListener("change", () => {
    if (picker.files?.length) sendFiles([...picker.files]);
    picker.value = "";
  });
  const messages = h("div", { id: "messages" });
  messages.addEventListener("scroll", () => {
    if (messages.scrollTop < 40) void loadOlder().catch(say);
  });
  main.replaceChildren(
    h("header", { id: "header" }),
    h("section", { id: "members" }),
    messages,
    h("div", { id: "typing", class: "typing" }),
    h("div", { class: "composer" }, h("span", { id: "editing" }), picker,
      h("button", { id: "attach", title: "Send a file", click: () => picker.click() }, "📎"), input,
      h("button", { id: "send", click: () => (send(input.value), (input.value = ""), (typingOn = false)) }, "Send")),
  );
  // Files dropped anywhere on the conversation are sent to it.
  main.ondragover = (e) => {
    e.preventDefault();
    main.classList.add("dropping");
  };
  main.ondragleave = () => main.classList.remove("dropping");
  main.ondrop = (e) => {
    e.preventDefault();
    main.classList.remove("dropping");
    if (e.dataTransfer?.files.length) sendFiles([...e.dataTransfer.files]);
  };
  renderHeader();
  renderMembers();
  renderMessages(true);
  renderTyping();
  renderComposer();
  input.focus();
}

function renderHeader(): void {
  const el = $("header");
  const conv = openId ? convs.get(openId) : undefined;
  if (!el || !conv) return;
  const p = peer(conv);
  const info = p ? presence.get(p) : undefined;
  const status = !p
    ? `${conv.members?.length ?? 0} members`
    : info?.online
      ? "online"
      : info?.last_seen_ms
        ? `last seen ${time(info.last_seen_ms)}`
        : "offline";
  el.replaceChildren(...present(
    h("strong", { id: "conversation-title" }, title(conv)),
    h("span", { id: "presence", class: "status" }, status),
    conv.item.kind === "group" &&
      h("button", { id: "toggle-members", click: () => ((showMembers = !showMembers), renderMembers()) }, "Members"),
    h(
      "button",
      { id: "mute", click: () => void client!.mute(conv.item.conversation_id, !conv.item.muted).then(() => ((conv.item.muted = !conv.item.muted), renderHeader())).catch(say) },
      conv.item.muted ? "Unmute" : "Mute",
    ),
  ));
}

function renderMembers(): void {
  const el = $("members");
  const conv = openId ? convs.get(openId) : undefined;
  if (!el || !conv) return;
  if (!showMembers || conv.item.kind !== "group") {
    el.replaceChildren();
    return;
  }
  const c = client!;
  const id = conv.item.conversation_id;
  const mine = conv.members?.find((m) => m.user_id === me)?.role ?? "member";
  const add = h("input", { id: "add-member", placeholder: "username" });
  el.replaceChildren(...present(
    h(
      "ul",
      {},
      ...(conv.members ?? []).map((m) =>
        h(
          "li",
          { class: "member" },
          `${nameOf(m.user_id)} (${m.role})`,
          m.user_id !== me && mine !== "member" && m.role !== "owner" &&
            h("button", { click: () => void c.removeMember(id, m.user_id).catch(say) }, "Remove"),
        ),
      ),
    ),
    mine !== "member" &&
      h(
        "form",
        {
          class: "row",
          submit: (e) => {
            e.preventDefault();
            void findUser(origin, token, add.value)
              .then((u) => (names.set(u.user_id, u.username), c.addMembers(id, [u.user_id])))
              .then((full) => ((conv.members = full.members), renderMembers()))
              .catch(say);
          },
        },
        add,
        h("button", { type: "submit" }, "Add"),
      ),
    h("button", { id: "leave", click: () => void c.leave(id).catch(say) }, "Leave group"),
  ));
}

/** A message of mine: sent, delivered (to every other member) or seen (by every other member). */
function status(conv: ConvState, seq: number): string {
  const others = (conv.members ?? []).filter((m) => m.user_id !== me);
  if (others.length === 0) return "sent";
  const all = (pick: "delivered" | "read") => others.every((m) => (conv.receipts.get(m.user_id)?.[pick] ?? 0) >= seq);
  if (all("read")) return "seen";
  if (all("delivered")) return "delivered";
  const seen = others.filter((m) => (conv.receipts.get(m.user_id)?.read ?? 0) >= seq).length;
  return seen > 0 ? `seen by ${seen}` : "sent";
}

function renderMessages(toBottom: boolean): void {
  const box = $("messages");
  const conv = openId ? convs.get(openId) : undefined;
  if (!box || !conv) return;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const c = client!;
  const id = conv.item.conversation_id;
  const rows: Node[] = [];
  if (conv.hasMore) rows.push(h("button", { id: "older", class: "older", click: () => void loadOlder().catch(say) }, "Load older messages"));
  for (const m of [...conv.messages.values()].sort((a, b) => a.seq - b.seq)) {
    if (m.kind !== "text" && m.kind !== "deleted") {
      rows.push(h("div", { class: "system", "data-seq": String(m.seq) }, system(m)));
      continue;
    }
    const mine = m.sender_id === me;
    const deleted = m.kind === "deleted";
    rows.push(
      h(
        "div",
        { class: `msg${mine ? " mine" : ""}${deleted ? " deleted" : ""}`, "data-seq": String(m.seq) },
        !mine && conv.item.kind === "group" && h("span", { class: "sender" }, nameOf(m.sender_id)),
        !deleted && m.attachment && attachmentView(m.attachment),
        (deleted || m.body || !m.attachment) && h("span", { class: "body" }, deleted ? "message deleted" : m.body),
        h(
          "span",
          { class: "meta" },
          m.edited_ms && !deleted ? "edited · " : "",
          time(m.ts_ms),
          mine && !deleted && h("span", { class: "receipt" }, ` · ${status(conv, m.seq)}`),
        ),
        !deleted && (m.reactions?.length ?? 0) > 0 &&
          h("span", { class: "reactions" }, m.reactions!.map((r) => `${r.emoji} ${r.count}`).join("  ")),
        !deleted &&
          h(
            "span",
            { class: "actions" },
            ...REACTIONS.map((emoji) =>
              h(
                "button",
                {
                  class: m.my_reaction === emoji ? "react chosen" : "react",
                  title: `react ${emoji}`,
                  click: () => void c.react(id, m.seq, m.my_reaction === emoji ? "" : emoji).catch(say),
                },
                emoji,
              ),
            ),
            mine &&
              h("button", {
                class: "edit",
                click: () => {
                  editing = { conv: id, seq: m.seq };
                  const input = $("composer") as HTMLTextAreaElement | null;
                  if (input) (input.value = m.body), input.focus();
                  renderComposer();
                },
              }, "Edit"),
            (mine || conv.item.kind === "group") &&
              h("button", { class: "delete", click: () => void c.delete(id, m.seq).catch(say) }, "Delete"),
          ),
      ),
    );
  }
  for (const l of outbox.get(id) ?? []) {
    rows.push(
      h(
        "div",
        { class: "msg mine pending", "data-client-msg-id": l.clientMsgId },
        h("span", { class: "body" }, l.file ? `📎 ${l.file.name}` : l.body),
        h(
          "span",
          { class: "meta" },
          h(
            "span",
            { class: "receipt" },
            l.failed
              ? `not sent: ${l.failed}`
              : l.file && l.file.sent < l.file.total
                ? `uploading ${Math.floor((100 * l.file.sent) / Math.max(1, l.file.total))}%`
                : "sending",
          ),
        ),
      ),
    );
  }
  box.replaceChildren(...rows);
  if (toBottom || atBottom) box.scrollTop = box.scrollHeight;
}

function renderTyping(): void {
  const el = $("typing");
  const conv = openId ? convs.get(openId) : undefined;
  if (!el || !conv) return;
  const who = [...conv.typing].map(nameOf);
  el.textContent = who.length === 0 ? "" : `${who.join(", ")} ${who.length === 1 ? "is" : "are"} typing…`;
}

function renderComposer(): void {
  const el = $("editing");
  if (el) el.textContent = editing ? "Editing (Esc to cancel)" : "";
}

// ---- boot -------------------------------------------------------------------

const saved = sessionStorage.getItem("switchboard");
if (saved) {
  const s = JSON.parse(saved) as { token: string; user_id: Id; username: string };
  start(s.token, s.user_id, s.username);
} else {
  renderLogin();
}
