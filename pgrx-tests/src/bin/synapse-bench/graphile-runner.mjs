// The peer `make bench` compares Synapse with: Graphile Worker in its batched
// configuration (a local queue of 500 jobs per process, completions and
// failures batched) running one no-op task. The bench writes this file next to
// its own npm install of graphile-worker and runs it:
//   node runner.mjs migrate   installs (or updates) the graphile_worker schema
//   node runner.mjs work      runs one worker process until it is killed
// Settings come from the environment: DATABASE_URL and CONCURRENCY.
import { run, runMigrations } from "graphile-worker";

const concurrency = Number(process.env.CONCURRENCY || "64");
const preset = {
  worker: {
    connectionString: process.env.DATABASE_URL,
    concurrentJobs: concurrency,
    // As Graphile's own performance test sizes it: a connection per job slot, plus one.
    maxPoolSize: concurrency + 1,
    localQueue: { size: 500 },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  },
};

const mode = process.argv[2];
if (mode === "migrate") {
  await runMigrations({ preset });
} else if (mode === "work") {
  const runner = await run({
    preset,
    taskList: { noop: async () => {} },
  });
  // The bench's sign that this process is up (Graphile's own "looking for
  // jobs" line is silenced with NO_LOG_SUCCESS, as its per-job lines are).
  console.log("runner: worker started");
  await runner.promise;
} else {
  console.error("usage: node runner.mjs migrate|work");
  process.exit(2);
}
