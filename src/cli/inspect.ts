import { inspectCheckpoint } from '../plan/inspect.js';
import type { FormatName } from '../checkpoints/registry.js';
import { formatBytes } from '../util/size.js';
import { usage } from '../util/errors.js';

export async function runInspect(path: string, opts: { format?: FormatName; json?: boolean; limit: string }): Promise<void> {
  const r = await inspectCheckpoint(path, opts.format);
  if (opts.json) {
    process.stdout.write(JSON.stringify(r, null, 2) + '\n');
    return;
  }
  const limit = Number(opts.limit);
  if (!Number.isInteger(limit) || limit < 0) throw usage(`--limit: ${opts.limit} is not a whole number`);
  const lines: string[] = [];
  lines.push(`path:        ${r.path}`);
  lines.push(`format:      ${r.format}`);
  lines.push(`tensors:     ${r.tensorCount}`);
  lines.push(`total bytes: ${r.totalBytes} (${formatBytes(r.totalBytes)})`);
  lines.push(`dtypes:      ${Object.entries(r.dtypes).map(([d, h]) => `${d} ×${h.tensors} (${formatBytes(h.bytes)})`).join(', ') || '-'}`);
  lines.push(`data files:  ${r.dataFiles.join(', ') || '-'}`);
  lines.push(`side files:  ${r.sideFiles.join(', ') || '-'}`);
  if (Object.keys(r.metadata).length) lines.push(`metadata:    ${Object.entries(r.metadata).map(([k, v]) => `${k}=${v}`).join(', ')}`);
  if (r.objects.length) {
    lines.push(`objects:     ${r.objects.length}`);
    for (const o of r.objects.slice(0, limit || undefined)) lines.push(`  ${o.name} = ${o.summary}`);
  }
  lines.push('');
  const rows = (limit ? r.tensors.slice(0, limit) : r.tensors).map((t) => [t.name, t.dtype, `[${t.shape.join(', ')}]`, String(t.bytes), t.where]);
  const head = ['name', 'dtype', 'shape', 'bytes', 'stored in'];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i]!.length)));
  const fmt = (row: string[]): string => row.map((c, i) => (i === 3 ? c.padStart(widths[i]!) : c.padEnd(widths[i]!))).join('  ').trimEnd();
  lines.push(fmt(head));
  for (const row of rows) lines.push(fmt(row));
  if (limit && r.tensors.length > limit) lines.push(`… ${r.tensors.length - limit} more (--limit 0 lists all)`);
  process.stdout.write(lines.join('\n') + '\n');
}
