// The wire types of docs/protocol.md (JSON subprotocol `switchboard.v1.json`).
// Ids of users and conversations are strings: they are 64-bit and JavaScript
// numbers lose precision above 2^53.

export type Id = string;

export type MessageKind =
  | "text"
  | "group_created"
  | "member_added"
  | "member_removed"
  | "member_left"
  | "role_changed"
  | "edit"
  | "delete"
  | "deleted";

export type Role = "member" | "admin" | "owner";

export interface ReactionCount {
  emoji: string;
  count: number;
}

export interface Message {
  conversation_id: Id;
  seq: number;
  ts_ms: number;
  sender_id: Id;
  client_msg_id: string;
  kind: MessageKind;
  body: string;
  target_user_id?: Id;
  role?: Role;
  target_seq?: number;
  edited_ms?: number;
  reactions?: ReactionCount[];
  my_reaction?: string;
  /** A file sent with the message (`body` is its caption). */
  attachment?: Attachment;
}

/** An attachment as messages carry it: size, type, checksum and name as the server checked the upload. */
export interface Attachment {
  attachment_id: string;
  file_name: string;
  media_type: string;
  size: number;
  sha256: string;
  width?: number;
  height?: number;
  /** A small inline preview the sender chose (e.g. a base64 data URL thumbnail). */
  preview?: string;
}

/** What a send names: an uploaded attachment and how to show it. */
export interface AttachmentRef {
  attachment_id: string;
  width?: number;
  height?: number;
  preview?: string;
}

export interface Member {
  user_id: Id;
  role: Role;
}

export interface Conversation {
  conversation_id: Id;
  kind: "direct" | "group";
  title: string;
  members: Member[];
  last_seq: number;
  last_ts_ms: number;
  created_ms: number;
}

export interface ConversationItem {
  conversation_id: Id;
  kind: "direct" | "group";
  title: string;
  last_seq: number;
  last_ts_ms: number;
  read_seq: number;
  unread: number;
  muted: boolean;
  last_message?: Message;
}

export interface ConversationList {
  items: ConversationItem[];
  next_cursor?: string;
}

export interface HistoryPage {
  conversation_id: Id;
  messages: Message[];
  has_more: boolean;
}

export interface Ack {
  conversation_id: Id;
  client_msg_id: string;
  seq: number;
  ts_ms: number;
}

export interface Welcome {
  user_id: Id;
  connection_id: Id;
  server_time_ms: number;
  max_frame_bytes: number;
}

export interface SyncDone {
  conversations: number;
  messages: number;
}

export interface Typing {
  conversation_id: Id;
  user_id: Id;
  typing: boolean;
  expires_ms: number;
}

export interface Receipt {
  conversation_id: Id;
  user_id: Id;
  delivered_seq: number;
  read_seq: number;
}

export interface Receipts {
  conversation_id: Id;
  members: { user_id: Id; delivered_seq: number; read_seq: number }[];
}

export interface Reaction {
  conversation_id: Id;
  seq: number;
  user_id: Id;
  emoji: string;
  reactions: ReactionCount[];
}

export interface PresenceInfo {
  user_id: Id;
  online: boolean;
  last_seen_ms?: number;
}

/** One frame from the server, as decoded JSON. */
export interface ServerFrame {
  type: string;
  id?: number;
  [field: string]: unknown;
}
