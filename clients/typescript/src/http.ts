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
