/**
 * Text to token ids and back for `verify --logits --prompt` / `--generate`, read from a Hugging
 * Face model directory's tokenizer.json (+ tokenizer_config.json). It uses
 * `@huggingface/tokenizers` (Tokenizers.js): Hugging Face's own pure-JS port of the `tokenizers`
 * pipeline, small and without dependencies, native code or wasm — unlike transformers.js, which
 * brings onnxruntime and sharp.
 *
 * Special tokens follow transformers 5's `tokenizer(text)`: with a tokenizer.json present, its
 * post-processor alone decides them (transformers drops tokenizer_config.json's add_bos_token /
 * add_eos_token then); tokenizer_config.json gives the bos/eos tokens and decoding options.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { badInput, ioError, isErrno } from '../util/errors.js';

export interface TextTokenizer {
  /** Ids as transformers' `tokenizer(text)["input_ids"]`, special tokens (e.g. a BOS) included. */
  encode(text: string): number[];
  /** Text of `ids`, special tokens skipped (`decode(ids, skip_special_tokens=True)`). */
  decode(ids: readonly number[]): string;
  /** Number of token ids, added tokens included (`len(tokenizer)`). */
  readonly vocabSize: number;
  /** tokenizer_config.json's bos_token / eos_token as ids, when set and known to the tokenizer. */
  readonly bosId: number | undefined;
  readonly eosId: number | undefined;
  /** The tokenizer.json it was read from. */
  readonly source: string;
}

type Json = Record<string, unknown>;

const isObject = (v: unknown): v is Json => typeof v === 'object' && v !== null && !Array.isArray(v);

/** The file parsed as a JSON object; undefined when it does not exist. */
async function readJsonObject(file: string): Promise<Json | undefined> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    if (isErrno(e) && e.code === 'ENOENT') return undefined;
    throw isErrno(e) ? ioError(e, file) : e;
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw badInput(`${file}: not valid JSON (${(e as Error).message})`, file, undefined, e);
  }
  if (!isObject(value)) throw badInput(`${file}: expected a JSON object`, file);
  return value;
}

/** A special token of tokenizer_config.json: a string, or an AddedToken object `{content: ...}`. */
function tokenText(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (isObject(v) && typeof v.content === 'string') return v.content;
  return undefined;
}

/**
 * Reads `<dir>/tokenizer.json` (and tokenizer_config.json when present); undefined when the dir
 * has no tokenizer.json. Throws a BAD_INPUT error naming the file on a malformed file.
 */
export async function loadTokenizer(dir: string): Promise<TextTokenizer | undefined> {
  const source = join(dir, 'tokenizer.json');
  const json = await readJsonObject(source);
  if (json === undefined) return undefined;
  const configFile = join(dir, 'tokenizer_config.json');
  const config = (await readJsonObject(configFile)) ?? {};

  if (!isObject(json.model) || typeof json.model.type !== 'string') {
    throw badInput(`${source}: no tokenizer model (expected "model": {"type": ...})`, source);
  }
  if (json.added_tokens !== undefined && !Array.isArray(json.added_tokens)) {
    throw badInput(`${source}: "added_tokens" is not a list`, source);
  }
  let tok: Tokenizer;
  try {
    // Tokenizers.js reads a few optional keys of its own; absent ones it wants as null / [].
    tok = new Tokenizer(
      { normalizer: null, pre_tokenizer: null, post_processor: null, decoder: null, ...json, added_tokens: json.added_tokens ?? [] },
      config,
    );
  } catch (e) {
    throw badInput(`${source}: cannot build the tokenizer: ${(e as Error).message}`, source, undefined, e);
  }

  const idOf = (key: string): number | undefined => {
    const text = tokenText(config[key]);
    return text === undefined ? undefined : tok.token_to_id(text);
  };
  // transformers skips clean_up_tokenization_spaces for BPE models (it corrupts their output).
  const cleanUp = config.clean_up_tokenization_spaces === true && json.model.type !== 'BPE';
  let count = 0;
  for (const id of tok.get_vocab(true).values()) count = Math.max(count, id + 1);

  return {
    encode: (text) => tok.encode(text).ids,
    decode: (ids) =>
      ids.length === 0 ? '' : tok.decode([...ids], { skip_special_tokens: true, clean_up_tokenization_spaces: cleanUp }),
    vocabSize: count,
    bosId: idOf('bos_token'),
    eosId: idOf('eos_token'),
    source,
  };
}
