/**
 * The published-checkpoint harness (test/published/README.md), pure TypeScript: every model of
 * test/published/models.json as its hub repo has it — the exact tensor names, shapes and dtypes
 * transformers 5.24 saves for its published config, plus the hub-only tensors — as sparse
 * checkpoints:
 *
 * - at full size, a dry run of HF → Megatron for each parallel layout the manifest lists (planning
 *   a 75,944-tensor Qwen3-Next must work, and fit the memory budget);
 * - on a layer-truncated copy (the same names, shapes and dtypes for every layer kind the model
 *   has, fewer layers; data in three windows of every tensor), a real HF → Megatron → HF round
 *   trip through torch_dist, checked tensor by tensor: names, shapes, dtypes and bytes; and
 *   through legacy rank files for the layouts that have them.
 *
 * Peak RSS is reported for every run and held to the budget + 150 MB (the memory contract);
 * times are reported, never asserted (speed is measured in bench/).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  compareSafetensorsDirs,
  expertCount,
  truncateConfigExperts,
  truncatedExperts,
  truncateTensorExperts,
  publishedConfig,
  publishedModels,
  publishedTensors,
  runCli,
  truncateConfig,
  truncatedLayers,
  tensorBytes,
  truncateTensors,
  layerCount,
  deepseekCopies,
  writeSparseCheckpoint,
  type CliRun,
  type TensorSpec,
} from '../helpers/published.js';

const MiB = 2 ** 20;
/** The memory contract: peak RSS within --max-memory + 150 MB. */
const SLACK = 150e6;
const FULL_BUDGET = 1024 * MiB;
const TRUNCATED_BUDGET = 256 * MiB;

let tmp: string;
before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'ss-published-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

function report(what: string, r: CliRun): string {
  return `${what}: ${r.seconds.toFixed(1)} s${r.rss ? `, peak RSS ${(r.rss / MiB).toFixed(0)} MiB` : ''}`;
}

function withinBudget(what: string, r: CliRun, budget: number): void {
  if (r.rss !== undefined) assert.ok(r.rss <= budget + SLACK, `${what}: peak RSS ${(r.rss / MiB).toFixed(0)} MiB exceeds the ${(budget / MiB).toFixed(0)} MiB budget + 150 MB`);
}

const models = await publishedModels();

for (const m of models) {
  test(`${m.id}: the published checkpoint plans at full size (${m.dryRuns.map((d) => d.join(' ') || 'defaults').join('; ')})`, async (t) => {
    const dir = join(tmp, `${m.id}-full`);
    const tensors = await publishedTensors(m);
    const w = await writeSparseCheckpoint(dir, await publishedConfig(m), tensors, { data: 'holes' });
    // MXFP4 blocks and scales are read as one bf16 tensor (4 bytes of bf16 per byte of blocks), FP8
    // weights and their block scales as one bf16 tensor (2 bytes per byte).
    const scales = tensors.filter((x) => x[0].endsWith('_scales') || x[0].endsWith('_scale_inv'));
    const blocks = tensors.filter((x) => x[0].endsWith('_blocks'));
    const fp8 = tensors.filter((x) => x[1] === 'F8_E4M3');
    const sum = (l: TensorSpec[]): number => l.reduce((n, x) => n + tensorBytes(x), 0);
    const srcBytes = w.bytes - sum(scales) + 3 * sum(blocks) + sum(fp8);
    for (const extra of m.dryRuns) {
      const r = await runCli(['convert', '--to', 'megatron', dir, join(tmp, `${m.id}-never`), '--dry-run', '--json', ...extra]);
      assert.equal(r.code, 0, `${extra.join(' ')}: ${r.stderr}`);
      const plan = JSON.parse(r.stdout) as { plan: { source: { tensors: number; bytes: number } } };
      assert.equal(plan.plan.source.tensors, tensors.length - scales.length);
      assert.equal(plan.plan.source.bytes, srcBytes);
      t.diagnostic(report(`dry run ${extra.join(' ') || '(defaults)'} of ${tensors.length} tensors, ${(w.bytes / 1e9).toFixed(1)} GB`, r));
      withinBudget(`dry run ${extra.join(' ')}`, r, FULL_BUDGET);
    }
  });
}

/**
 * `SHARDSHIFT_PUBLISHED=full` (`npm run test:published`): every layout the manifest lists, every
 * expert, every model. The default tier — the one `npm test` and CI run, on 2 cores within about 30
 * minutes for the whole suite — keeps 8 experts (a multiple of 8 ≥ top-k), runs the legacy layouts
 * only where the manifest's `ci` says so and leaves the two 70B-class dense models to their
 * full-size dry runs; each expert kept has its exact names, shapes and dtypes.
 */
const FULL = process.env.SHARDSHIFT_PUBLISHED === 'full';

for (const m of models) {
  const label0 = FULL ? 'every expert' : 'experts cut to a multiple of 8';
  test(`${m.id}: a layer-truncated copy (${label0}) round-trips HF → Megatron → HF with every name, shape, dtype and byte`, { skip: !FULL && m.ci?.roundTrip === false ? 'a larger sibling of a family round-tripped above: full tier only (npm run test:published)' : false }, async (t) => {
    const published = await publishedConfig(m);
    const layers = truncatedLayers(published);
    const E = expertCount(published);
    const keep = FULL ? E : truncatedExperts(published);
    let config = truncateConfig(published, layers);
    let tensors = truncateTensors(await publishedTensors(m), layers, layerCount(published));
    if (E !== undefined && keep !== undefined && keep < E) {
      config = truncateConfigExperts(config, keep);
      tensors = truncateTensorExperts(tensors, E, keep);
    }
    const dir = join(tmp, `${m.id}-cut`);
    const outputs: string[] = [dir];
    t.after(async () => {
      for (const o of outputs) await rm(o, { recursive: true, force: true });
    });
    // MXFP4 blocks left zero: the bf16 export of GPT-OSS experts is transposed, and data in every
    // block window would make it dense (GBs of disk); the MXFP4 values are checked bit for bit by
    // test/interop/gptoss.test.ts.
    await writeSparseCheckpoint(dir, config, tensors, { data: 'windows', shardBytes: 2e9, skipData: /_blocks$/, ...(m.hub.deepseekMtp ? { copyOf: deepseekCopies } : {}) });
    const legacy = m.dryRuns.filter((d) => d.includes('torch') && (FULL || m.ci?.legacy));
    const layouts = [[], ...legacy.map((d) => d.filter((x, i, a) => x !== '--pp' && a[i - 1] !== '--pp'))];
    for (const extra of layouts) {
      const label = extra.join(' ') || 'torch_dist';
      const meg = join(tmp, `${m.id}-cut-meg-${layouts.indexOf(extra)}`);
      const back = `${meg}-hf`;
      outputs.push(meg, back);
      const a = await runCli(['convert', '--to', 'megatron', dir, meg, '-q', '--max-memory', '256MiB', ...(m.roundTripDtype ? ['--dtype', m.roundTripDtype] : []), ...extra]);
      assert.equal(a.code, 0, `${label}: ${a.stderr}`);
      const b = await runCli(['convert', '--to', 'hf', meg, back, '-q', '--max-memory', '256MiB']);
      assert.equal(b.code, 0, `${label} → hf: ${b.stderr}`);
      const d = await compareSafetensorsDirs(dir, back);
      // MXFP4 sources come back unquantised: X_blocks + X_scales → X (bf16); FP8 ones likewise, X
      // (F8_E4M3) + X_scale_inv → X (bf16, same shape); nothing else changed. (The dequantised
      // values are checked bit for bit against the references by test/interop/gptoss.test.ts and
      // test/interop/deepseek.test.ts.)
      const mxfp4 = tensors.filter((x) => /_(blocks|scales)$/.test(x[0]));
      const fp8 = tensors.filter((x) => x[1] === 'F8_E4M3');
      const fp8Scales = tensors.filter((x) => x[0].endsWith('_scale_inv'));
      assert.deepEqual(d.missing.sort(), [...mxfp4, ...fp8Scales].map((x) => x[0]).sort(), `${label}: tensors lost on the way`);
      assert.deepEqual(d.extra.sort(), [...new Set(mxfp4.map((x) => x[0].replace(/_(blocks|scales)$/, '')))].sort(), `${label}: tensors that were not in the source`);
      assert.deepEqual(d.differing.sort(), fp8.map((x) => `${x[0]}: F8_E4M3 [${x[2].join(', ')}] vs BF16 [${x[2].join(', ')}]`).sort(), `${label}: tensors that differ`);
      assert.equal(d.compared, tensors.length - mxfp4.length - fp8.length - fp8Scales.length);
      t.diagnostic(`${label}: ${layers} layers${keep !== E ? `, ${keep} of ${E} experts` : ''}, ${d.compared} tensors, ${(d.bytes / 1e9).toFixed(2)} GB; ${report('HF → Megatron', a)}; ${report('Megatron → HF', b)}`);
      withinBudget(`${label} HF → Megatron`, a, TRUNCATED_BUDGET);
      withinBudget(`${label} Megatron → HF`, b, TRUNCATED_BUDGET);
      await rm(meg, { recursive: true, force: true });
      await rm(back, { recursive: true, force: true });
    }
  });
}
