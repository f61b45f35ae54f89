export { SwitchboardClient, newClientMsgId } from "./client.js";
export type {
  ClientEvents,
  ClientOptions,
  ConnectionState,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export { SwitchboardError } from "./errors.js";
export { absolute, downloadUrl, findUser, getUsers, login, register, requestUploadSlot, sha256Hex, upload } from "./http.js";
export type { UploadSlot, UserInfo } from "./http.js";
export type * from "./types.js";
