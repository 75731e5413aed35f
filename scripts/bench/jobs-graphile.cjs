// The graphile-worker side of scripts/bench/jobs, run by node with
// GRAPHILE_DIR set to the scratch folder holding node_modules/graphile-worker:
//   node jobs-graphile.cjs throughput JOBS CONCURRENCY LOCAL_QUEUE BATCH_DELAY_MS
//       adds JOBS no-op jobs with addJobs (one call), VACUUM ANALYZE, then
//       times a worker pool (run()) with CONCURRENCY draining them, with
//       preset.worker.localQueue.size = LOCAL_QUEUE (-1: off) and
//       completeJobBatchDelay = failJobBatchDelay = BATCH_DELAY_MS (-1: off).
//       Prints "jobs=N seconds=S rate=R ..."
//   node jobs-graphile.cjs latency JOBS CONCURRENCY LOCAL_QUEUE BATCH_DELAY_MS
//       an idle worker pool; JOBS single jobs added one at a time with
//       addJob from a pool of their own, each once the last one started.
//       Prints "jobs=N p50_ms=.. p99_ms=.. max_ms=.. mean_ms=.."
//
// Throughput is defined as for pgcoord (see jobs.lua): t0 just before run()
// with the jobs committed and the schema migrated; t1 the first moment,
// after the last task returned, at which none of graphile_worker's jobs is
// left (completed jobs are deleted), polled every millisecond from the
// lowest id the last poll found.
// Connections come from the PG* environment, like pgcoord-run's.
"use strict";
const path = require("path");
const { performance } = require("perf_hooks");

const dir = process.env.GRAPHILE_DIR;
if (!dir) throw new Error("GRAPHILE_DIR is not set");
const gw = require(path.join(dir, "node_modules", "graphile-worker"));
const pg = require(path.join(dir, "node_modules", "pg"));

const [mode, jobsArg, concArg, lqArg, delayArg] = process.argv.slice(2);
const n = parseInt(jobsArg, 10);
const concurrency = parseInt(concArg, 10);
const localQueue = parseInt(lqArg, 10);
const batchDelay = parseInt(delayArg, 10);
if (!(n > 0 && concurrency > 0) || Number.isNaN(localQueue) || Number.isNaN(batchDelay)) {
  throw new Error("usage: jobs-graphile.cjs throughput|latency JOBS CONCURRENCY LOCAL_QUEUE BATCH_DELAY_MS");
}

// Quiet: graphile-worker logs every job at info level by default.
const logger = new gw.Logger(() => (level, message) => {
  if (level === "error") console.error(message);
});

function preset() {
  const worker = { concurrentJobs: concurrency };
  if (localQueue > 0) worker.localQueue = { size: localQueue };
  if (batchDelay >= 0) {
    worker.completeJobBatchDelay = batchDelay;
    worker.failJobBatchDelay = batchDelay;
  }
  return { worker };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(fn, limitMs, what) {
  const deadline = performance.now() + limitMs;
  while (!(await fn())) {
    if (performance.now() > deadline) throw new Error(`no ${what} within ${limitMs} ms`);
    await sleep(1);
  }
}

function pct(sorted, p) {
  return sorted[Math.max(0, Math.ceil(p * sorted.length) - 1)];
}

function makePool(max) {
  const pool = new pg.Pool({ max });
  pool.on("error", (err) => console.error("pool error:", err.message));
  pool.on("connect", (client) => client.on("error", (err) => console.error("client error:", err.message)));
  return pool;
}

async function main() {
  const pool = makePool(10);
  await gw.runMigrations({ pgPool: pool, logger });
  const utils = await gw.makeWorkerUtils({ pgPool: pool, logger });
  // A clean slate: nothing left from an earlier run.
  await pool.query("DELETE FROM graphile_worker._private_jobs");

  // A worker pool with the bench's settings running taskList.
  const startRunner = (taskList) =>
    gw.run({
      pgPool: pool,
      logger,
      concurrency,
      noHandleSignals: true,
      pollInterval: 10000,
      preset: preset(),
      taskList,
    });

  if (mode === "throughput") {
    let done = 0;
    const specs = [];
    for (let i = 0; i < n; i++) specs.push({ identifier: "noop", payload: {} });
    const added = await utils.addJobs(specs);
    if (added.length !== n) throw new Error(`addJobs added ${added.length}`);
    await pool.query("VACUUM ANALYZE graphile_worker._private_jobs");
    // as jobs.lua's none_left_poll: the lowest id left, the next poll from there
    let lowest = "0";
    const noneLeft = async () => {
      const { rows } = await pool.query(
        "SELECT id FROM graphile_worker._private_jobs WHERE id >= $1 ORDER BY id LIMIT 1", [lowest]);
      if (rows.length === 0) return true;
      lowest = rows[0].id;
      return false;
    };
    const cpu0 = process.cpuUsage();

    const t0 = performance.now();
    const runner = await startRunner({
      noop: async () => {
        done++;
      },
    });
    await waitFor(() => done >= n, 300000, "last task");
    const tHandlers = performance.now();
    await waitFor(noneLeft, 60000, "empty table");
    const t1 = performance.now();
    const cpu = process.cpuUsage(cpu0);

    await runner.stop();
    const seconds = (t1 - t0) / 1000;
    console.log(
      `jobs=${n} seconds=${seconds.toFixed(4)} rate=${(n / seconds).toFixed(1)}` +
        ` handlers_done_at=${((tHandlers - t0) / 1000).toFixed(4)}` +
        ` cpu=${((cpu.user + cpu.system) / 1e6).toFixed(3)}`,
    );
  } else if (mode === "latency") {
    const warmup = 50;
    const producer = await gw.makeWorkerUtils({ pgPool: makePool(1), logger });
    const startedAt = new Map();
    let notify = null;
    const runner = await startRunner({
      ping: async (payload) => {
        startedAt.set(payload.i, performance.now());
        if (notify) notify(payload.i);
      },
    });
    await sleep(200);
    const ms = [];
    for (let i = 1; i <= warmup + n; i++) {
      const started = new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`job ${i} did not start within 5 s`)), 5000);
        notify = (j) => {
          if (j === i) {
            clearTimeout(timer);
            resolve();
          }
        };
      });
      const sentAt = performance.now();
      await producer.addJob("ping", { i });
      await started;
      if (i > warmup) ms.push(startedAt.get(i) - sentAt);
    }
    await runner.stop();
    await producer.release();
    ms.sort((a, b) => a - b);
    const mean = ms.reduce((a, b) => a + b, 0) / ms.length;
    console.log(
      `jobs=${ms.length} p50_ms=${pct(ms, 0.5).toFixed(3)} p99_ms=${pct(ms, 0.99).toFixed(3)}` +
        ` max_ms=${ms[ms.length - 1].toFixed(3)} mean_ms=${mean.toFixed(3)}`,
    );
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
  await utils.release();
  await pool.end();
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
