export { SwitchboardClient, newClientMsgId } from "./client.js";
export type {
  ClientEvents,
  ClientOptions,
  ConnectionState,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export { SwitchboardError } from "./errors.js";
export { findUser, getUsers, login, register } from "./http.js";
export type { UserInfo } from "./http.js";
export type * from "./types.js";
