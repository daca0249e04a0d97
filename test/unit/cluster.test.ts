/**
 * Cluster profiles without a cluster (issue 18): env.toml reading (Nemotron's generated files as
 * they are, `extends`, `${oc.env:…}`), what a submission would run (`-b … -d` prints both batch
 * scripts), the Kubernetes Indexed Job manifest (parsed back and checked field by field; applied
 * through a kubectl double on PATH, since no Kubernetes API server can run here), and every bad
 * input: one message, exit 2, nothing submitted or written. The real Slurm path is slurm.test.ts.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile, mkdir, chmod } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseAllDocuments } from 'yaml';
import { repoRoot } from '../helpers/oracle.js';
import { runCli } from '../helpers/cli.js';
import { envFileCandidates, interpolate, loadProfile } from '../../src/cluster/profiles.js';
import { slurmMiB } from '../../src/cluster/slurm.js';

const example = join(repoRoot, 'examples', 'tiny-llama');

/** The fields of a batch/v1 Job these tests read. */
interface K8sJob {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string };
  spec: {
    completionMode?: string;
    completions?: number;
    parallelism?: number;
    template: { spec: { restartPolicy: string; volumes: unknown[]; containers: Array<{ image: string; command: string[]; resources: { requests: { memory: string } }; volumeMounts: Array<{ mountPath: string }> }> } };
  };
}
const jobsOf = (text: string): K8sJob[] => parseAllDocuments(text).map((d) => d.toJS() as K8sJob);
let tmp: string;
let env: string;

/** The shape of Nemotron's generated env.slurm.toml: a base profile with its launcher keys, and the conversion profile extending it. */
const NEMOTRON_ENV = `
[wandb]
project = "nemotron"

[slurm]
executor = "slurm"
account = "\${oc.env:SLURM_ACCOUNT,coreai_dlalgo_llm}"
partition = "\${oc.env:TEST_PARTITION,batch}"
time = "04:00:00"
tunnel = "ssh"
host = "login-eos.example"
user = "me"
remote_job_dir = "/lustre/me/nemo-run"
container_image = "nvcr.io/nvidia/nemo:25.11"
mounts = ["/lustre:/lustre"]
env_vars = { HF_HOME = "/lustre/me/hf" }

[slurm_convert_model]
extends = "slurm"
nodes = 1
ntasks_per_node = 8
gpus_per_node = 8
time = "02:00:00"

[lepton_convert_model]
executor = "lepton"
nodes = 1

[dgxcloud_convert_model]
executor = "dgxcloud"

[k8s_convert_model]
executor = "k8s"
image = "ghcr.io/example/shardshift:1"
namespace = "ml"
pvc = "shared-ckpts"
mount_path = "/data"
parts = 3
mem_per_part = "8G"
`;

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-cluster-'));
  env = join(tmp, 'env.toml');
  await writeFile(env, NEMOTRON_ENV);
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

test('a Nemotron-generated env.toml is read as it is: extends, ${oc.env:VAR,default}, launcher keys ignored and listed', async () => {
  const p = await loadProfile('slurm_convert_model', { envFile: env, env: { TEST_PARTITION: 'cpu' } });
  assert.equal(p.executor, 'slurm');
  assert.equal(p.values.partition, 'cpu');
  assert.equal(p.values.account, 'coreai_dlalgo_llm');
  assert.equal(p.values.time, '02:00:00', 'the child overrides its parent');
  assert.deepEqual(p.values.env_vars, { HF_HOME: '/lustre/me/hf' });
  assert.deepEqual([...p.ignored].sort(), ['host', 'remote_job_dir', 'tunnel', 'user']);
  assert.equal(interpolate('${oc.env:NOPE,${oc.env:ALSO_NOPE,x}}-y', {}, 'here'), 'x-y');
  assert.equal(interpolate("${oc.env:NOPE,''}", {}, 'here'), '');
});

test('the env.toml search order: --env, $SHARDSHIFT_ENV, $NEMOTRON_ENV_FILE, ./env.toml, the user config dir', () => {
  assert.deepEqual(envFileCandidates('a.toml', { SHARDSHIFT_ENV: '/x' }, '/w'), ['/w/a.toml']);
  assert.deepEqual(envFileCandidates(undefined, { SHARDSHIFT_ENV: '/x', NEMOTRON_ENV_FILE: '/n' }, '/w'), ['/x']);
  assert.deepEqual(envFileCandidates(undefined, { NEMOTRON_ENV_FILE: '/n', XDG_CONFIG_HOME: '/c' }, '/w'), ['/n', '/w/env.toml', '/c/shardshift/env.toml']);
});

test('Slurm memory sizes in MiB', () => {
  assert.equal(slurmMiB('4G'), 4096);
  assert.equal(slurmMiB('500M'), 500);
  assert.equal(slurmMiB('2048'), 2048);
  assert.throws(() => slurmMiB('lots'), /expected a Slurm size/);
});

test('--batch -d prints the array and finalize scripts: no GPUs requested (said), CPUs and memory per part, the profile\'s account and partition', async () => {
  const out = join(tmp, 'dry');
  const r = await runCli(['convert', '--to', 'megatron', example, out, '--batch', 'slurm_convert_model', '--env', env, '--parts', '4', '--cpus-per-part', '3', '--mem-per-part', '6G', '--dry-run'], { TEST_PARTITION: 'cpu' });
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /asks for GPUs \(gpus_per_node 8\): shardshift needs none/);
  assert.match(r.stderr, /Nemotron launcher keys not used .*tunnel/);
  assert.match(r.stderr, /container_image nvcr\.io\/nvidia\/nemo:25\.11 is not used/);
  assert.match(r.stdout, /#SBATCH --array=0-3\n/);
  assert.match(r.stdout, /#SBATCH --partition=cpu\n/);
  assert.match(r.stdout, /#SBATCH --account=coreai_dlalgo_llm\n/);
  assert.match(r.stdout, /#SBATCH --cpus-per-task=3\n#SBATCH --mem=6G\n/);
  assert.match(r.stdout, /export HF_HOME=\/lustre\/me\/hf\n/);
  assert.match(r.stdout, /-q --part "\$\{SLURM_ARRAY_TASK_ID\}\/4"\n/);
  assert.match(r.stdout, /finalize -q .*dry\n/);
  assert.doesNotMatch(r.stdout, /gres|gpus/);
  assert.match(r.stdout, /submission dry run: nothing submitted/);
  assert.ok(!existsSync(out) && !existsSync(`${out}.partial`) && !existsSync(`${out}.slurm`), 'nothing written');
});

test('container = true runs the parts in the profile\'s image through pyxis, with its mounts', async () => {
  const f = join(tmp, 'container.toml');
  await writeFile(f, '[c]\nexecutor = "slurm"\ncontainer = true\ncontainer_image = "ghcr.io/example/shardshift:1"\nmounts = ["/lustre:/lustre", "/home:/home"]\n');
  const r = await runCli(['convert', '--to', 'megatron', example, join(tmp, 'c-out'), '-b', 'c', '--env', f, '--parts', '2', '--dry-run']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /exec srun --container-image=ghcr\.io\/example\/shardshift:1 --container-mounts=\/lustre:\/lustre,\/home:\/home shardshift convert /);
});

test('executor k8s: an Indexed Job of one completion per part, and the finalize Job; applied with kubectl when it is on PATH', async () => {
  const out = join(tmp, 'k8s-out');
  const r = await runCli(['convert', '--to', 'megatron', example, out, '-b', 'k8s_convert_model', '--env', env, '--dry-run']);
  assert.equal(r.code, 0, r.stderr);
  const docs = jobsOf(r.stdout);
  assert.equal(docs.length, 2);
  const [parts, fin] = docs as [K8sJob, K8sJob];
  assert.equal(parts.apiVersion, 'batch/v1');
  assert.equal(parts.kind, 'Job');
  assert.equal(parts.metadata.namespace, 'ml');
  assert.equal(parts.spec.completionMode, 'Indexed');
  assert.equal(parts.spec.completions, 3);
  assert.equal(parts.spec.parallelism, 3);
  const pod = parts.spec.template.spec;
  assert.equal(pod.restartPolicy, 'Never', 'Indexed Jobs need restartPolicy Never or OnFailure');
  assert.equal(pod.containers[0]!.image, 'ghcr.io/example/shardshift:1');
  assert.equal(pod.containers[0]!.resources.requests.memory, '8Gi');
  assert.match(pod.containers[0]!.command.at(-1)!, /--part "\$JOB_COMPLETION_INDEX\/3"$/);
  assert.deepEqual(pod.volumes, [{ name: 'shared', persistentVolumeClaim: { claimName: 'shared-ckpts' } }]);
  assert.equal(pod.containers[0]!.volumeMounts[0]!.mountPath, '/data');
  assert.equal(fin.kind, 'Job');
  assert.deepEqual(fin.spec.template.spec.containers[0]!.command, ['shardshift', 'finalize', '-q', out]);

  // A kubectl double records what it is asked to apply.
  const bin = join(tmp, 'bin');
  await mkdir(bin, { recursive: true });
  await writeFile(join(bin, 'kubectl'), `#!/bin/sh\necho "$@" > ${join(tmp, 'kubectl.args')}\ncat > ${join(tmp, 'kubectl.stdin')}\necho job.batch/shardshift-k8s-out-parts created\n`);
  await chmod(join(bin, 'kubectl'), 0o755);
  const a = await runCli(['convert', '--to', 'megatron', example, out, '-b', 'k8s_convert_model', '--env', env], { PATH: `${bin}:${process.env.PATH}` });
  assert.equal(a.code, 0, a.stderr);
  assert.equal((await readFile(join(tmp, 'kubectl.args'), 'utf8')).trim(), 'apply -f -');
  const applied = jobsOf(await readFile(join(tmp, 'kubectl.stdin'), 'utf8'));
  assert.equal(applied.length, 1, 'the parts Job only: the finalize must wait for it');
  assert.equal(applied[0]!.spec.completionMode, 'Indexed');
  assert.match(a.stdout, /submitted .* in 3 parts: job\.batch\/shardshift-k8s-out-parts created/);
  assert.match(a.stdout, /apply the finalize Job/);
});

test('bad cluster input: one message, exit 2, nothing submitted or written', async () => {
  const out = join(tmp, 'bad');
  const cases: Array<{ args: string[]; env?: Record<string, string>; toml?: string; message: RegExp }> = [
    { args: ['-b', 'slurm_covert_model'], message: /has no profile "slurm_covert_model"; it has: slurm, slurm_convert_model, lepton_convert_model, dgxcloud_convert_model, k8s_convert_model/ },
    { args: ['-b', 'p'], toml: '[p]\nexecutor = "slurm"\npartitoin = "cpu"\n', message: /\[p\] has an unknown key "partitoin"; valid keys: extends, executor, account, partition,/ },
    { args: ['-b', 'p'], toml: '[p]\nexecutor = "slurm"\nnodes = "two"\n', message: /\[p\] nodes must be a integer, not "two"/ },
    { args: ['-b', 'p'], toml: '[p]\nexecutor = "slurm"\nmounts = "/a:/a"\n', message: /\[p\] mounts must be a list of strings/ },
    { args: ['-b', 'p'], toml: '[p\nexecutor = "slurm"\n', message: /not valid TOML/ },
    { args: ['-b', 'lepton_convert_model'], message: /uses executor "lepton", which shardshift cannot drive; use a slurm or k8s profile, or run `--part i\/n`/ },
    { args: ['-b', 'dgxcloud_convert_model'], message: /uses executor "dgxcloud", which shardshift cannot drive/ },
    { args: ['-b', 'slurm_convert_model', '--parts', '0'], message: /--parts 0: expected a whole number ≥ 1/ },
    { args: ['-b', 'slurm_convert_model', '-r', 'slurm_convert_model'], message: /are alternatives: pass one/ },
    { args: ['-b', 'slurm_convert_model', '--part', '5/4'], message: /--part 5\/4/ },
    { args: ['-b', 'slurm_convert_model', '--part', '1/4', '--parts', '3'], message: /disagree/ },
    { args: ['-r', 'k8s_convert_model'], message: /-r\/--run \(attached\) runs the parts under srun/ },
    // sbatch missing from PATH: refused before anything is written.
    { args: ['-b', 'slurm_convert_model'], env: { PATH: '/nonexistent' }, message: /sbatch is not on PATH: run shardshift on a login node/ },
  ];
  for (const c of cases) {
    let file = env;
    if (c.toml) {
      file = join(tmp, 'bad.toml');
      await writeFile(file, c.toml);
    }
    const r = await runCli(['convert', '--to', 'megatron', example, out, '--env', file, ...c.args], c.env);
    assert.equal(r.code, 2, `${c.args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, c.message, c.args.join(' '));
    assert.equal(r.stderr.trim().split('\n').filter((l) => l.startsWith('shardshift: error')).length, 1, r.stderr);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
    assert.ok(!existsSync(out) && !existsSync(`${out}.partial`) && !existsSync(`${out}.slurm`), `${c.args.join(' ')}: nothing written`);
  }
  const none = await runCli(['convert', '--to', 'megatron', example, out, '-b', 'x'], { SHARDSHIFT_ENV: join(tmp, 'missing.toml') });
  assert.equal(none.code, 2);
  assert.match(none.stderr, /no env\.toml found \(looked for .*missing\.toml\)/);
  // A finalize on a directory that is not a partitioned run.
  await mkdir(join(tmp, 'plain'));
  const fin = await runCli(['finalize', join(tmp, 'plain')]);
  assert.equal(fin.code, 2);
  assert.match(fin.stderr, /is not a partitioned run/);
});
