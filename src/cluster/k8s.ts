/**
 * A partitioned run on Kubernetes: an Indexed Job (`completionMode: Indexed`, one completion per
 * part; the pod's JOB_COMPLETION_INDEX is the part) and a finalize Job to apply after it
 * completes (Kubernetes has no job-to-job dependency; `kubectl wait --for=condition=complete`
 * between the two does it). Printed as one multi-document YAML (rendered by the `yaml` package),
 * for `kubectl apply -f -`. The shared file system is the profile's PVC, mounted at the same path
 * in every pod.
 */
import { stringify } from 'yaml';
import { usage } from '../util/errors.js';
import type { Profile } from './profiles.js';
import { execFile } from 'node:child_process';
import { badInput } from '../util/errors.js';
import { onPath, type ArraySubmission } from './slurm.js';

export function renderK8s(p: Profile, s: ArraySubmission): string {
  const v = p.values as Record<string, unknown>;
  const image = (v.image ?? v.container_image) as string | undefined;
  if (!image) throw usage(`profile ${p.name} (${p.file}): executor k8s needs image = "<an image with node and shardshift>"`);
  const name = `shardshift-${s.out.split('/').filter(Boolean).at(-1)!.toLowerCase().replace(/[^a-z0-9-]+/g, '-').slice(0, 40)}`;
  const cpus = s.cpusPerPart ?? (v.cpus_per_part as number | undefined) ?? (v.cpus_per_task as number | undefined) ?? 2;
  const mem = s.memPerPart ?? (v.mem_per_part as string | undefined) ?? (v.mem as string | undefined) ?? '4G';
  const memK8s = mem.replace(/^(\d+)([KMGT])$/i, (_m, n: string, u: string) => `${n}${u.toUpperCase()}i`);
  const env = Object.entries((v.env_vars as Record<string, unknown> | undefined) ?? {}).map(([k, x]) => ({ name: k, value: String(x) }));
  const volumes = v.pvc ? [{ name: 'shared', persistentVolumeClaim: { claimName: String(v.pvc) } }] : [];
  const volumeMounts = v.pvc ? [{ name: 'shared', mountPath: String(v.mount_path ?? s.cwd) }] : [];
  const pod = (command: string[]): Record<string, unknown> => ({
    spec: {
      restartPolicy: 'Never',
      containers: [{ name: 'shardshift', image, workingDir: s.cwd, command, env, resources: { requests: { cpu: String(cpus), memory: memK8s }, limits: { memory: memK8s } }, volumeMounts }],
      volumes,
    },
  });
  const meta = (n: string): Record<string, unknown> => ({ name: n, ...(v.namespace ? { namespace: String(v.namespace) } : {}), labels: { 'app.kubernetes.io/name': 'shardshift' } });
  const quote = (a: string): string => `'${a.replace(/'/g, `'\\''`)}'`;
  const args = s.argv.map(quote).join(' ');
  const parts = {
    apiVersion: 'batch/v1',
    kind: 'Job',
    metadata: meta(s.only ? `${name}-part-${s.only[0]}` : `${name}-parts`),
    // A resubmitted part (--part i/n) is one plain completion; all parts are one Indexed Job; a
    // batch of checkpoints is one Indexed Job whose index picks the checkpoint (POSIX sh has no
    // arrays: `set --` the values, shift to the pod's).
    spec: s.batch
      ? {
          completionMode: 'Indexed',
          completions: s.batch.values.length,
          parallelism: s.batch.values.length,
          backoffLimitPerIndex: 1,
          template: pod(['/bin/sh', '-c', `set -- ${s.batch.values.join(' ')}; shift "$JOB_COMPLETION_INDEX"; exec shardshift ${s.argv.map((a) => (a.startsWith(`${s.batch!.key}=`) ? `${s.batch!.key}="$1"` : quote(a))).join(' ')} -q`]),
        }
      : s.only
      ? { completions: 1, backoffLimit: 1, template: pod(['/bin/sh', '-c', `exec shardshift ${args} -q --part ${s.only[0]}/${s.parts}`]) }
      : {
          completionMode: 'Indexed',
          completions: s.parts,
          parallelism: s.parts,
          backoffLimitPerIndex: 1,
          template: pod(['/bin/sh', '-c', `exec shardshift ${args} -q --part "$JOB_COMPLETION_INDEX/${s.parts}"`]),
        },
  };
  const finalize = { apiVersion: 'batch/v1', kind: 'Job', metadata: meta(s.batch ? `${name}-summary` : `${name}-finalize`), spec: { backoffLimit: 2, template: pod(s.batch ? ['shardshift', ...s.argv] : ['shardshift', 'finalize', '-q', s.out]) } };
  return [
    `# Parts of ${s.out}: kubectl apply -f this; kubectl wait --for=condition=complete job/${name}-parts; then the finalize Job.`,
    stringify(parts).trimEnd(),
    '---',
    stringify(finalize),
  ].join('\n');
}

/**
 * With kubectl on PATH, applies the parts Job of a rendered manifest (`kubectl apply -f -`) and
 * returns what kubectl said plus the finalize Job, to apply once the parts complete (applying
 * both at once would race). Undefined when kubectl is not there.
 */
export async function applyParts(manifest: string, env: NodeJS.ProcessEnv = process.env): Promise<{ applied: string; finalize: string } | undefined> {
  if (!onPath('kubectl', env)) return undefined;
  const [parts, finalize] = manifest.split('\n---\n') as [string, string];
  const applied = await new Promise<string>((res, rej) => {
    const c = execFile('kubectl', ['apply', '-f', '-'], { encoding: 'utf8', env }, (err, stdout, stderr) => (err ? rej(badInput(`kubectl apply failed: ${(stderr || err.message).trim()}`)) : res(stdout.trim())));
    c.stdin?.end(parts);
  });
  return { applied, finalize };
}
