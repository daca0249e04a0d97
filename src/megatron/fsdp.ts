/**
 * Megatron-FSDP `fsdp_dtensor` checkpoints (Megatron-LM `fsdp_dtensor_checkpoint.py`,
 * `preprocess_fsdp_dtensor_state_dict`; Megatron-Bridge `convert_checkpoints_fsdp.py`): plain DCP
 * in `iter_XXXXXXX/` — no `metadata.json`, no `common.pt` — of `{"model": <wrapped model state
 * dict>, …}`, so keys are state-dict paths under a module prefix (`model.module.decoder.layers.<i>.…`,
 * one key per layer, no stacking), with SwiGLU `linear_fc1.weight` split into `weight_w` (gate)
 * and `weight_v` (up), tensors row-sharded unevenly over the FSDP ranks (DCP chunks).
 *
 * Reading exposes the torch_dist per-layer view (prefix stripped, `weight_w`/`weight_v` joined
 * back into `[gate; up]` lazily) that the model maps read; writing produces the layout above.
 * The module prefix is probed the way Megatron-LM's `dist_checkpoint_io.py` does
 * (`model.module.module.`, `model.module.`, `model.`); shardshift writes `model.module.`, the
 * prefix Megatron-LM's checkpoint inspector uses.
 */
import { writeDcp } from '../formats/dcp.js';
import { rowConcat, allRows, produceBox } from '../lazy/expr.js';
import type { CheckpointSource } from '../formats/types.js';
import type { OutputFile, SourceTensor, TargetTensor } from '../lazy/types.js';
import { PyFloat, type PyValue } from '../pickle/values.js';
import { sliceTarget } from '../lazy/view.js';
import { badInput } from '../util/errors.js';
import { targetView } from '../lazy/view.js';

const PREFIXES = ['model.module.module.', 'model.module.', 'model.'];
export const FSDP_PREFIX = 'model.module.';

/** The module prefix of an fsdp_dtensor checkpoint's model keys, or undefined if it is not one. */
export function fsdpPrefix(names: readonly string[]): string | undefined {
  for (const p of PREFIXES) {
    if (names.some((n) => n.startsWith(`${p}decoder.layers.`) && /^decoder\.layers\.\d+\./.test(n.slice(p.length)))) return p;
  }
  return undefined;
}

/** The torch_dist-style per-layer view of an fsdp_dtensor source (lazy). */
export function fsdpView(src: CheckpointSource, prefix: string): CheckpointSource {
  const tensors = new Map<string, SourceTensor>();
  const halves = new Map<string, { w?: SourceTensor; v?: SourceTensor }>();
  for (const t of src.tensors.values()) {
    if (!t.name.startsWith(prefix)) continue; // optimizer state and the like
    const name = t.name.slice(prefix.length);
    const m = /^(.*\.linear_fc1\.(?:weight|bias))_([wv])$/.exec(name);
    if (m) {
      const h = halves.get(m[1]!) ?? {};
      h[m[2] as 'w' | 'v'] = t;
      halves.set(m[1]!, h);
      continue;
    }
    tensors.set(name, { name, dtype: t.dtype, shape: t.shape, byteLength: t.byteLength, where: t.where, read: (b, o) => t.read(b, o) });
  }
  for (const [name, h] of halves) {
    if (!h.w || !h.v) throw badInput(`${src.path}: ${name} has its ${h.w ? 'gate (_w)' : 'up (_v)'} half but not the other`, src.path, name);
    const joined = rowConcat(name, h.w.dtype, h.w.shape.slice(1), [allRows(h.w), allRows(h.v)], `[${h.w.name}; ${h.v.name}]`);
    tensors.set(name, { name, dtype: joined.dtype, shape: joined.shape, byteLength: joined.byteLength, where: joined.describe, read: (b, o) => produceBox(joined, b, o) });
  }
  return { ...src, tensors };
}

/**
 * The DCP files of an fsdp_dtensor checkpoint for per-layer global targets (torch_dist names),
 * under `iter_XXXXXXX/`, plus the tracker file.
 */
export function writeMegatronFsdp(globals: ReadonlyMap<string, TargetTensor>, opts: { iteration: number; files?: number }): OutputFile[] {
  const targets: TargetTensor[] = [];
  const paths = new Map<string, ReadonlyArray<string | number>>();
  const add = (name: string, t: TargetTensor): void => {
    const full = `${FSDP_PREFIX}${name}`;
    targets.push(targetView(t, { name: full }));
    paths.set(full, ['model', full.slice('model.'.length)]);
  };
  for (const [name, g] of globals) {
    if (/\.linear_fc1\.(weight|bias)$/.test(name)) {
      const half = g.shape[0]! / 2;
      add(`${name}_w`, sliceTarget(g, 0, 0, half));
      add(`${name}_v`, sliceTarget(g, 0, half, half));
    } else add(name, g);
  }
  const objects = new Map<string, PyValue>([
    ['checkpoint_version', new PyFloat(3.0)],
    ['iteration', opts.iteration],
  ]);
  for (const k of objects.keys()) paths.set(k, [k]);
  const iterDir = `iter_${String(opts.iteration).padStart(7, '0')}`;
  const { files } = writeDcp(targets, { files: opts.files, objects, paths });
  const out = files.map((f) => ({ ...f, relPath: `${iterDir}/${f.relPath}` }));
  const tracker = Buffer.from(String(opts.iteration));
  out.push({ relPath: 'latest_checkpointed_iteration.txt', size: tracker.length, parts: [tracker] });
  return out;
}
