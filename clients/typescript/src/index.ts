export { SwitchboardClient, newClientMsgId } from "./client.js";
export type {
  ClientEvents,
  ClientOptions,
  ConnectionState,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export { SwitchboardError } from "./errors.js";
export { login, register } from "./http.js";
export type * from "./types.js";
