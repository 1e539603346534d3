// The customer's Supabase project, as far as the app reaches it through
// quern's pass-through: Edge Functions (the hook's sync fallback), GoTrue's
// password sign-in, PostgREST on `analysis_jobs`, Storage uploads and the
// Realtime websocket (Phoenix's protocol, vsn 1.0.0, as realtime-js speaks
// it). A PATCH of an `analysis_jobs` row is broadcast as a postgres change to
// the sockets subscribed to the table, as Supabase's Realtime would.
//
// Prints `{"port": N}` once listening; `GET /__seen` answers every request
// it received (method, path, query, the headers a test checks, body).
import http from "node:http";
import { randomUUID } from "node:crypto";
import { WebSocketServer } from "ws";

const ACCESS_TOKEN = process.env.FAKE_ACCESS_TOKEN ?? "";
const seen = [];
const subscribers = new Set();
const rows = new Map();

const json = (response, status, body, headers = {}) => {
  response.writeHead(status, { "content-type": "application/json", ...headers });
  response.end(JSON.stringify(body));
};

const server = http.createServer(async (request, response) => {
  const url = new URL(request.url, "http://fake");
  if (url.pathname === "/__seen") return json(response, 200, seen);
  const chunks = [];
  for await (const chunk of request) chunks.push(chunk);
  const body = Buffer.concat(chunks).toString("utf8");
  const pick = ["authorization", "apikey", "content-type", "content-length", "transfer-encoding", "prefer", "x-upsert",
                "x-hub-signature-256", "x-client-info"];
  const headers = Object.fromEntries(pick.filter((name) => request.headers[name]).map((name) => [name, request.headers[name]]));
  seen.push({ method: request.method, path: url.pathname, query: url.search, headers, body });

  if (url.pathname.startsWith("/functions/v1/")) {
    return json(response, 200, { from: "customer-functions", foods: "arroz" });
  }
  if (url.pathname === "/auth/v1/token" && url.searchParams.get("grant_type") === "password") {
    const { email } = JSON.parse(body);
    const user = { id: "3f1c2a9e-0000-4000-8000-00000000a11c", aud: "authenticated", role: "authenticated", email,
                   app_metadata: { provider: "email" }, user_metadata: {}, created_at: new Date().toISOString() };
    return json(response, 200, { access_token: ACCESS_TOKEN, token_type: "bearer", expires_in: 3600,
                                  expires_at: Math.floor(Date.now() / 1000) + 3600, refresh_token: "refresh-1", user });
  }
  if (url.pathname === "/rest/v1/analysis_jobs") {
    if (request.method === "GET") {
      const list = [...rows.values()];
      return json(response, 200, list, { "content-range": `0-${Math.max(list.length - 1, 0)}/*` });
    }
    if (request.method === "PATCH") {
      const id = (url.searchParams.get("id") ?? "").replace(/^eq\./, "");
      const old = rows.get(id) ?? { id, status: "pending" };
      const record = { ...old, ...JSON.parse(body), updated_at: new Date().toISOString() };
      rows.set(id, record);
      broadcast("UPDATE", record, old);
      response.writeHead(204);
      return response.end();
    }
    if (request.method === "POST") {
      const record = { id: randomUUID(), status: "pending", ...JSON.parse(body) };
      rows.set(record.id, record);
      broadcast("INSERT", record, {});
      return json(response, 201, [record]);
    }
  }
  if (url.pathname.startsWith("/storage/v1/object/") && request.method === "POST") {
    const key = url.pathname.slice("/storage/v1/object/".length);
    return json(response, 200, { Key: key, Id: randomUUID() });
  }
  json(response, 404, { message: `the fake has no ${request.method} ${url.pathname}` });
});

// Realtime: one binding id per postgres_changes filter of a join.
const sockets = new WebSocketServer({ noServer: true });
server.on("upgrade", (request, socket, head) => {
  const url = new URL(request.url, "http://fake");
  seen.push({ method: "GET", path: url.pathname, query: url.search, headers: { upgrade: request.headers.upgrade }, body: "" });
  if (url.pathname !== "/realtime/v1/websocket") return socket.destroy();
  sockets.handleUpgrade(request, socket, head, (ws) => {
    ws.on("message", (data) => {
      const message = JSON.parse(data.toString());
      const reply = (response) => ws.send(JSON.stringify({ topic: message.topic, event: "phx_reply",
        payload: { status: "ok", response }, ref: message.ref, join_ref: message.join_ref }));
      if (message.event === "phx_join") {
        const changes = (message.payload.config?.postgres_changes ?? []).map((filter, i) => ({ id: 1000 + i, ...filter }));
        for (const binding of changes) subscribers.add({ ws, topic: message.topic, binding });
        reply({ postgres_changes: changes });
      } else if (message.event === "heartbeat" || message.event === "phx_leave") {
        reply({});
      }
    });
    ws.on("close", () => {
      for (const subscriber of subscribers) if (subscriber.ws === ws) subscribers.delete(subscriber);
    });
  });
});

function broadcast(type, record, oldRecord) {
  for (const { ws, topic, binding } of subscribers) {
    if (binding.table !== "analysis_jobs" || (binding.event !== "*" && binding.event !== type)) continue;
    const columns = Object.keys(record).map((name) => ({ name, type: "text" }));
    ws.send(JSON.stringify({ topic, event: "postgres_changes", ref: null, payload: { ids: [binding.id], data: {
      type, schema: "public", table: "analysis_jobs", commit_timestamp: new Date().toISOString(),
      columns, record, old_record: type === "UPDATE" ? { id: oldRecord.id } : {}, errors: null } } }));
  }
}

server.listen(0, "127.0.0.1", () => {
  console.log(JSON.stringify({ port: server.address().port }));
});
