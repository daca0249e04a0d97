// A real, private Slurm for the cluster tests: munged, slurmctld and slurmd started as root in
// a fresh temp state dir (own munge key and socket, own ports, own spool), one node (this
// machine) in one partition `cpu`, and stopped by their pid files at the end. Nothing system-wide
// is touched except installing the Debian packages when they are missing (root only):
// `apt-get install -y slurm-wlm munge`, as ../docs (Cluster) says.
//
// Usage from the test command: `const slurm = await startSlurm(); … slurm.stop()`; the tests
// find it through the environment `slurm.env` adds (SLURM_CONF, SHARDSHIFT_TEST_SLURM=1).
// Run alone (`node scripts/slurm.mjs`) it starts one, prints `export SLURM_CONF=…` and waits
// for Ctrl-C.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { createServer } from 'node:net';
import { hostname, tmpdir, totalmem, cpus } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { setInterval } from 'node:timers';

const BINARIES = ['munged', 'slurmctld', 'slurmd', 'sbatch', 'srun', 'squeue', 'scancel', 'sinfo'];
const SBIN = ['/usr/sbin', '/usr/bin', '/sbin', '/bin'];

function which(cmd) {
  for (const d of [...(process.env.PATH ?? '').split(':'), ...SBIN]) if (d && existsSync(join(d, cmd))) return join(d, cmd);
  return undefined;
}

/** Installs slurm-wlm and munge when they are missing (root, apt-get); returns why not when it cannot. */
export function ensureSlurmPackages(log = (m) => process.stderr.write(m + '\n')) {
  const missing = BINARIES.filter((b) => !which(b));
  if (!missing.length) return undefined;
  if (process.getuid?.() !== 0) return `Slurm is not installed (${missing.join(', ')} missing) and this is not root: run \`apt-get install -y slurm-wlm munge\``;
  if (!which('apt-get')) return `Slurm is not installed (${missing.join(', ')} missing) and there is no apt-get`;
  log('slurm: installing slurm-wlm and munge (first run on this machine only, about a minute)');
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  // apt needs a sticky, world-writable /tmp (some images ship it 755).
  spawnSync('chmod', ['1777', '/tmp']);
  let r = spawnSync('apt-get', ['update', '-qq'], { env, stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status === 0) r = spawnSync('apt-get', ['install', '-y', '-qq', 'slurm-wlm', 'munge'], { env, stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status !== 0) return `apt-get install slurm-wlm munge failed (exit ${r.status})`;
  const still = BINARIES.filter((b) => !which(b));
  return still.length ? `after apt-get install, still missing: ${still.join(', ')}` : undefined;
}

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}


function killPidFile(file) {
  if (!existsSync(file)) return;
  const pid = Number(readFileSync(file, 'utf8').trim());
  if (pid > 0) try { process.kill(pid, 'SIGTERM'); } catch { /* gone */ }
}

/**
 * Starts a private Slurm; resolves when the node is idle. `stop()` ends every daemon and removes
 * the state dir. Throws with the reason when Slurm cannot be started.
 */
export async function startSlurm({ log = (m) => process.stderr.write(m + '\n') } = {}) {
  const why = ensureSlurmPackages(log);
  if (why) throw new Error(why);
  if (process.getuid?.() !== 0) throw new Error('a private Slurm needs root here (slurmd runs jobs as their user; no sudo on this machine kind)');
  const dir = mkdtempSync(join(tmpdir(), 'shardshift-slurm-'));
  chmodSync(dir, 0o755);
  const m = join(dir, 'munge');
  mkdirSync(m, { mode: 0o700 });
  const key = join(m, 'munge.key');
  writeFileSync(key, randomBytes(1024), { mode: 0o400 });
  const socket = join(m, 'munge.socket');
  const pids = { munge: join(m, 'munged.pid'), ctld: join(dir, 'slurmctld.pid'), slurmd: join(dir, 'slurmd.pid') };
  const stop = () => {
    killPidFile(pids.slurmd);
    killPidFile(pids.ctld);
    killPidFile(pids.munge);
  };
  try {
    execFileSync(which('munged'), ['--force', `--key-file=${key}`, `--socket=${socket}`, `--pid-file=${pids.munge}`, `--log-file=${join(m, 'munged.log')}`, `--seed-file=${join(m, 'munged.seed')}`], { stdio: 'ignore' });
    for (const d of ['spool', 'state']) mkdirSync(join(dir, d));
    const node = hostname().split('.')[0];
    const memMiB = Math.max(1024, Math.floor(totalmem() / 2 ** 20) - 2048);
    const [ctldPort, slurmdPort] = [await freePort(), await freePort()];
    const conf = join(dir, 'slurm.conf');
    writeFileSync(conf, [
      'ClusterName=shardshift-test',
      `SlurmctldHost=${node}`,
      'SlurmUser=root',
      'SlurmdUser=root',
      'AuthType=auth/munge',
      'CredType=cred/munge',
      `AuthInfo=socket=${socket}`,
      'ProctrackType=proctrack/linuxproc',
      'TaskPlugin=task/none',
      'JobAcctGatherType=jobacct_gather/none',
      'SelectType=select/cons_tres',
      'SelectTypeParameters=CR_Core_Memory',
      'ReturnToService=2',
      'MpiDefault=none',
      'SchedulerType=sched/backfill',
      'MinJobAge=600',
      `SlurmctldPort=${ctldPort}`,
      `SlurmdPort=${slurmdPort}`,
      `StateSaveLocation=${join(dir, 'state')}`,
      `SlurmdSpoolDir=${join(dir, 'spool')}`,
      `SlurmctldPidFile=${pids.ctld}`,
      `SlurmdPidFile=${pids.slurmd}`,
      `SlurmctldLogFile=${join(dir, 'slurmctld.log')}`,
      `SlurmdLogFile=${join(dir, 'slurmd.log')}`,
      `NodeName=${node} CPUs=${cpus().length} RealMemory=${memMiB} State=UNKNOWN`,
      `PartitionName=cpu Nodes=${node} Default=YES MaxTime=INFINITE State=UP`,
      '',
    ].join('\n'));
    const env = { ...process.env, SLURM_CONF: conf };
    execFileSync(which('slurmctld'), ['-f', conf], { env, stdio: 'ignore' });
    execFileSync(which('slurmd'), ['-f', conf], { env, stdio: 'ignore' });
    for (let i = 0; ; i++) {
      const r = spawnSync(which('sinfo'), ['-h', '-o', '%t'], { env, encoding: 'utf8' });
      if (r.status === 0 && /^idle/m.test(r.stdout)) break;
      if (i > 60) throw new Error(`the private Slurm did not come up in 30 s (sinfo: ${(r.stdout + r.stderr).trim()}); logs in ${dir}`);
      await sleep(500);
    }
  } catch (e) {
    stop();
    throw e;
  }
  log(`slurm: private controller up (${dir})`);
  return {
    dir,
    env: { SLURM_CONF: join(dir, 'slurm.conf'), SHARDSHIFT_TEST_SLURM: '1' },
    stop: () => {
      stop();
      // The daemons may take a moment to exit; their state goes with them.
      spawnSync('sleep', ['1']);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const s = await startSlurm();
  process.stdout.write(`export SLURM_CONF=${s.env.SLURM_CONF}\n`);
  const end = () => {
    s.stop();
    process.exit(0);
  };
  process.on('SIGINT', end);
  process.on('SIGTERM', end);
  setInterval(() => {}, 1 << 30);
}
