// Accounts over HTTP (docs/protocol.md section 2).

import { SwitchboardError } from "./errors.js";
import type { Id } from "./types.js";

function httpBase(url: string): string {
  return url.replace(/^ws(s?):\/\//, "http$1://").replace(/\/+$/, "");
}

async function post<T>(url: string, path: string, body: unknown): Promise<T> {
  let res: Response;
  try {
    res = await fetch(`${httpBase(url)}${path}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (e) {
    throw new SwitchboardError(0, "unavailable", `the gateway could not be reached: ${String(e)}`);
  }
  return answer<T>(res);
}

async function answer<T>(res: Response): Promise<T> {
  const json = (await res.json().catch(() => ({}))) as { error?: { code: number; name: string; message: string } };
  if (!res.ok) {
    const e = json.error;
    throw new SwitchboardError(e?.code ?? res.status, e?.name ?? "http_error", e?.message ?? `HTTP ${res.status}`);
  }
  return json as T;
}

/** Creates an account; resolves with its user id. */
export async function register(url: string, username: string, password: string): Promise<Id> {
  return (await post<{ user_id: Id }>(url, "/v1/register", { username, password })).user_id;
}

/** Logs in; the token goes to `new SwitchboardClient({ token })`. */
export async function login(
  url: string,
  username: string,
  password: string,
): Promise<{ token: string; user_id: Id; expires_in: number }> {
  return post(url, "/v1/login", { username, password });
}

export interface UserInfo {
  user_id: Id;
  username: string;
}

async function get<T>(url: string, path: string, token: string): Promise<T> {
  let res: Response;
  try {
    res = await fetch(`${httpBase(url)}${path}`, { headers: { authorization: `Bearer ${token}` } });
  } catch (e) {
    throw new SwitchboardError(0, "unavailable", `the gateway could not be reached: ${String(e)}`);
  }
  return answer<T>(res);
}

/** The user with this username (case-insensitive); rejects with `user_not_found`. */
export async function findUser(url: string, token: string, username: string): Promise<UserInfo> {
  return get(url, `/v1/users?username=${encodeURIComponent(username)}`, token);
}

/** Usernames for up to 100 user ids (unknown ids are left out). */
export async function getUsers(url: string, token: string, ids: Id[]): Promise<UserInfo[]> {
  if (ids.length === 0) return [];
  return (await get<{ users: UserInfo[] }>(url, `/v1/users?ids=${ids.join(",")}`, token)).users;
}

/** An upload slot (`POST /v1/attachments`). */
export interface UploadSlot {
  attachment_id: string;
  upload_url: string;
  method: string;
  headers: Record<string, string>;
  expires_ms: number;
}

/** Asks for an upload slot: the server checks membership, size, type, name and your budget. */
export async function requestUploadSlot(
  url: string,
  token: string,
  slot: { conversation_id: Id; size: number; media_type: string; sha256: string; file_name: string },
): Promise<UploadSlot> {
  let res: Response;
  try {
    res = await fetch(`${httpBase(url)}/v1/attachments`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify(slot),
    });
  } catch (e) {
    throw new SwitchboardError(0, "unavailable", `the gateway could not be reached: ${String(e)}`);
  }
  return answer<UploadSlot>(res);
}

/** Resolves a URL the gateway gave (relative ones are on the gateway itself). */
export function absolute(url: string, given: string): string {
  return new URL(given, `${httpBase(url)}/`).toString();
}

/** PUTs `bytes` to a slot's presigned URL, reporting progress where the platform can
 * (XMLHttpRequest in browsers: as bytes go; elsewhere: at the end). */
export async function upload(
  url: string,
  slot: UploadSlot,
  bytes: Uint8Array,
  onProgress?: (sent: number, total: number) => void,
): Promise<void> {
  const target = absolute(url, slot.upload_url);
  const XHR = (globalThis as { XMLHttpRequest?: typeof XMLHttpRequest }).XMLHttpRequest;
  if (XHR) {
    await new Promise<void>((ok, fail) => {
      const x = new XHR();
      x.open(slot.method, target);
      for (const [k, v] of Object.entries(slot.headers)) x.setRequestHeader(k, v);
      x.upload.onprogress = (e) => onProgress?.(e.loaded, bytes.length);
      x.onload = () => {
        if (x.status >= 200 && x.status < 300) return ok();
        let e: { code?: number; name?: string; message?: string } = {};
        try {
          e = (JSON.parse(x.responseText) as { error?: typeof e }).error ?? {};
        } catch {
          // Not JSON: the status says it.
        }
        fail(new SwitchboardError(e.code ?? x.status, e.name ?? "http_error", e.message ?? `HTTP ${x.status}`));
      };
      x.onerror = () => fail(new SwitchboardError(0, "unavailable", "the upload failed: network error"));
      x.send(new Blob([bytes as BlobPart]));
    });
    return;
  }
  let res: Response;
  try {
    res = await fetch(target, { method: slot.method, headers: slot.headers, body: bytes as BodyInit });
  } catch (e) {
    throw new SwitchboardError(0, "unavailable", `the upload failed: ${String(e)}`);
  }
  await answer<unknown>(res);
  onProgress?.(bytes.length, bytes.length);
}

/** A download URL for an attachment (members of its conversation only), absolute. */
export async function downloadUrl(
  url: string,
  token: string,
  attachmentId: string,
): Promise<{ url: string; expires_ms: number; size: number; media_type: string; file_name: string }> {
  const r = await get<{ url: string; expires_ms: number; size: number; media_type: string; file_name: string }>(
    url,
    `/v1/attachments/${encodeURIComponent(attachmentId)}`,
    token,
  );
  return { ...r, url: absolute(url, r.url) };
}

/** SHA-256 of `bytes`, lowercase hex (WebCrypto: browsers and Node alike). */
export async function sha256Hex(bytes: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes as BufferSource);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}
