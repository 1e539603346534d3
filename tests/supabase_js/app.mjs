// The customer's app against quern, through @supabase/supabase-js itself:
// the useAsyncAnalysis hook's two async routes, the seed's 400 answer, the
// hook's sync fallback (reaching the customer's functions, also with quern's
// workers stopped), a browser's CORS preflight, and the rest of the app's
// Supabase (sign-in, tables, storage, Realtime) through the same URL. Prints one JSON line of what it saw; exits 1 on
// the first thing that is not as the app expects.
import http from "node:http";
import { createClient } from "@supabase/supabase-js";
import WebSocket from "ws";

const { QUERN_URL, USER_TOKEN, ANON_KEY } = process.env;
const supabase = createClient(QUERN_URL, ANON_KEY, {
  global: { headers: { Authorization: `Bearer ${USER_TOKEN}` } },
  auth: { persistSession: false, autoRefreshToken: false },
});

function check(condition, what, seen) {
  if (!condition) {
    console.error(`not as the app expects: ${what}: ${JSON.stringify(seen)}`);
    process.exit(1);
  }
}

const seen = {};

// 1. enqueue-analysis, then get-analysis-status until it ends (the hook's loop).
const enqueued = await supabase.functions.invoke("enqueue-analysis", {
  body: { type: "echo", input: { imageUrl: "https://media.example/lunch.jpg", mealType: "lunch" } },
});
check(!enqueued.error, "enqueue-analysis answered", enqueued.error?.message);
check(enqueued.data.status === "pending" && enqueued.data.jobId, "a pending job with an id", enqueued.data);
seen.enqueued = enqueued.data;
const deadline = Date.now() + 20_000;
let status;
do {
  await new Promise((resolve) => setTimeout(resolve, 100));
  status = await supabase.functions.invoke("get-analysis-status", { body: { jobId: enqueued.data.jobId } });
  check(!status.error, "get-analysis-status answered", status.error?.message);
} while (!["completed", "failed", "cancelled"].includes(status.data.status) && Date.now() < deadline);
check(status.data.status === "completed", "the job completed", status.data);
check(status.data.result?.echo?.mealType === "lunch", "its result", status.data.result);
seen.completed = status.data.status;

// 2. The seed's 400: invoke reports a FunctionsHttpError whose response is the body.
const missing = await supabase.functions.invoke("enqueue-analysis", { body: { type: "echo" } });
check(missing.error?.name === "FunctionsHttpError", "a missing input is an HTTP error", missing.error?.name);
const body = await missing.error.context.json();
check(body.error === "Missing required fields: type, input", "the seed's words", body);
seen.missing = body;

// 3. The hook's sync fallback (callSyncFunction) with the type's flag off on
// a quern told to serve it: the customer's own function answers (rollback).
const fallback = await supabase.functions.invoke("sofia-image-analysis", {
  body: { imageUrl: "https://media.example/lunch.jpg", userId: "ignored" },
});
check(!fallback.error, "the sync fallback answered", fallback.error?.message);
check(fallback.data.from === "customer-functions", "the customer's function answered it", fallback.data);
seen.fallback = fallback.data;

// 3b. The same through a quern whose workers are stopped: the old sync flow.
const stopped = createClient(process.env.WORKERS_STOPPED_URL, ANON_KEY, {
  global: { headers: { Authorization: `Bearer ${USER_TOKEN}` } },
  auth: { persistSession: false, autoRefreshToken: false },
});
const offline = await stopped.functions.invoke("sofia-image-analysis", {
  body: { imageUrl: "https://media.example/lunch.jpg" },
});
check(!offline.error, "the fallback answered with the workers stopped", offline.error?.message);
check(offline.data.from === "customer-functions", "the customer's function answered it", offline.data);
seen.workers_stopped = offline.data;

// 4. A browser's preflight from the app's origin.
const preflight = await new Promise((resolve, reject) => {
  const url = new URL("/functions/v1/enqueue-analysis", QUERN_URL);
  const request = http.request(url, {
    method: "OPTIONS",
    headers: {
      Origin: "http://localhost:8080",
      "Access-Control-Request-Method": "POST",
      "Access-Control-Request-Headers": "authorization, x-client-info, apikey, content-type",
    },
  }, (response) => {
    response.resume();
    resolve({ status: response.statusCode, headers: response.headers });
  });
  request.on("error", reject);
  request.end();
});
check(preflight.status >= 200 && preflight.status < 300, "the preflight succeeds", preflight);
check(preflight.headers["access-control-allow-origin"] === "*", "any origin, as the seed", preflight.headers);
const allowed = preflight.headers["access-control-allow-headers"] ?? "";
for (const name of ["authorization", "x-client-info", "apikey", "content-type"]) {
  check(allowed.includes(name), `the preflight allows ${name}`, allowed);
}
seen.preflight = preflight.status;

// 5. One URL for the whole app: the hook's one client signs in, reads and
// cancels through `analysis_jobs`, uploads a photo and hears the change on
// Realtime, all at quern's URL (seed 000's hook cancels with
// `supabase.from('analysis_jobs').update({ status: 'cancelled' })`).
// Node 20 has no WebSocket of its own: realtime-js asks for `ws` there (a
// browser uses its native one).
const app = createClient(QUERN_URL, ANON_KEY, {
  auth: { persistSession: false, autoRefreshToken: false },
  realtime: { transport: WebSocket },
});
const signedIn = await app.auth.signInWithPassword({ email: "ana@example.com", password: "senha-de-teste" });
check(!signedIn.error && signedIn.data.session?.access_token, "signed in", signedIn.error?.message);
const job = await app.functions.invoke("enqueue-analysis", {
  body: { type: "echo", input: { imageUrl: "https://media.example/dinner.jpg" } },
});
check(!job.error && job.data.jobId, "enqueued with the session's token", job.error?.message ?? job.data);
const jobId = job.data.jobId;
let subscribed;
const ready = new Promise((resolve) => { subscribed = resolve; });
const heard = new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error("no Realtime event within 10 s")), 10_000);
  app.channel(`job-${jobId}`)
    .on("postgres_changes", { event: "UPDATE", schema: "public", table: "analysis_jobs", filter: `id=eq.${jobId}` },
      (change) => { clearTimeout(timer); resolve(change); })
    .subscribe((state, error) => {
      if (state === "SUBSCRIBED") subscribed();
      else if (error) reject(error);
    });
});
await ready;
const cancelled = await app.from("analysis_jobs").update({ status: "cancelled" }).eq("id", jobId);
check(!cancelled.error && cancelled.status === 204, "the cancel reached analysis_jobs", cancelled);
const change = await heard;
check(change.eventType === "UPDATE" && change.new.status === "cancelled" && change.new.id === jobId,
      "Realtime told of the cancel", change);
const read = await app.from("analysis_jobs").select("*").eq("id", jobId);
check(!read.error && read.data?.[0]?.status === "cancelled", "the table read", read);
const photo = new Uint8Array([0xff, 0xd8, 0xff, 0xe0, 1, 2, 3]);
const uploaded = await app.storage.from("meal-photos").upload(`${signedIn.data.user.id}/dinner.jpg`, photo, {
  contentType: "image/jpeg",
});
check(!uploaded.error && uploaded.data?.fullPath === `meal-photos/${signedIn.data.user.id}/dinner.jpg`,
      "the photo uploaded", uploaded.error?.message ?? uploaded.data);
seen.one_url = { jobId, realtime: change.new.status, uploaded: uploaded.data.fullPath };
await app.removeAllChannels();

console.log(JSON.stringify(seen));
