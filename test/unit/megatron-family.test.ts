/**
 * The family of a Megatron checkpoint without an HF config is each family's own claim
 * (`Family.megatronClaim`, issue 15) — and gives the decisions the hand-written string matching it
 * replaced gave, for every provider class and feature combination (the old rule is spelled out
 * here as the reference).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { familyForMegatron } from '../../src/models/registry.js';

function before(target: string, moe: boolean, qkNorm: boolean, qkvBias: boolean): string {
  return moe
    ? target.includes('mixtral') || (!target.includes('qwen') && !qkNorm) ? 'mixtral' : 'qwen3_moe'
    : target.includes('qwen3') ? 'qwen3' : target.includes('qwen2') || (target.includes('qwen') && qkvBias) ? 'qwen2' : target.includes('mistral') ? 'mistral' : qkNorm ? 'qwen3' : qkvBias ? 'qwen2' : 'llama';
}

const TARGETS = [
  '',
  'megatron.bridge.models.llama.llama_provider.llama31modelprovider8b',
  'megatron.bridge.models.mistral.mistral_provider.mistralmodelprovider',
  'megatron.bridge.models.qwen.qwen_provider.qwen2modelprovider',
  'megatron.bridge.models.qwen.qwen_provider.qwen25modelprovider7b',
  'megatron.bridge.models.qwen.qwen_provider.qwen3modelprovider',
  'megatron.bridge.models.qwen.qwen_provider.qwen3moemodelprovider',
  'megatron.bridge.models.qwen.qwen_provider.qwenmodelprovider',
  'megatron.bridge.models.mixtral.mixtral_provider.mixtralmodelprovider',
  'megatron.bridge.models.deepseek.deepseek_provider.deepseekv3modelprovider',
  'megatron.bridge.models.gpt_provider.gptmodelprovider',
];

test('familyForMegatron decides as the old string matching did, for every provider × MoE × q/k norm × QKV bias', () => {
  let n = 0;
  for (const target of TARGETS) {
    for (const moe of [false, true]) for (const qkNorm of [false, true]) for (const qkvBias of [false, true]) {
      const got = familyForMegatron({ target, moe, qkNorm, qkvBias, expertBias: false }, 'run_config.yaml').id;
      assert.equal(got, before(target, moe, qkNorm, qkvBias), `${target || '(args)'} moe=${moe} qkNorm=${qkNorm} qkvBias=${qkvBias}`);
      n++;
    }
  }
  assert.equal(n, TARGETS.length * 8);
});

test('a GQA MoE whose sigmoid router has an expert bias is GLM-4.5-shaped unless a provider class names its family', () => {
  const glm = 'megatron.bridge.models.gpt_provider.gptmodelprovider';
  for (const qkNorm of [false, true]) for (const qkvBias of [false, true]) {
    assert.equal(familyForMegatron({ target: glm, moe: true, qkNorm, qkvBias, expertBias: true, scoreFunction: 'sigmoid' }, 'run_config.yaml').id, 'glm4_moe');
    assert.equal(familyForMegatron({ target: '', moe: true, qkNorm, qkvBias, expertBias: true, scoreFunction: 'sigmoid' }, 'common.pt').id, 'glm4_moe');
    // A softmax router with an expert bias is no family's shape: refused, never taken for GLM.
    assert.throws(() => familyForMegatron({ target: glm, moe: true, qkNorm, qkvBias, expertBias: true, scoreFunction: 'softmax' }, 'run_config.yaml'), /no family matches the recorded model/);
    assert.equal(familyForMegatron({ target: 'megatron.bridge.models.mixtral.mixtral_provider.mixtralmodelprovider', moe: true, qkNorm, qkvBias, expertBias: true }, 'run_config.yaml').id, 'mixtral');
  }
});

test("a Megatron-Bridge VL provider's run_config is refused by name (its text family's map would miss the prefix and the tower)", () => {
  for (const target of ['megatron.bridge.models.qwen_vl.qwen3_vl_provider.qwen3vlmodelprovider', 'megatron.bridge.models.gemma_vl.gemma3_vl_provider.gemma3vlmodelprovider']) {
    assert.throws(() => familyForMegatron({ target, moe: false, qkNorm: true, qkvBias: false, expertBias: false }, 'run_config.yaml'), /a vision-language model .* give --hf-model/);
  }
});
