"""Fine-tuning on a retrieval dataset with the hyperparameters of the upstream releases.

Shared by configs/finetune_{msrvtt,msvd,lsmdc,didemo}.py; each of those picks its dataset.

Sources (every number below names one):
- [F-cfg] m-bain/frozen-in-time configs/msrvtt_4f_i21k.json — the only fine-tuning config either
  release publishes (MSR-VTT, 1k-A "jsfusion" cut).
- [F-train] frozen-in-time train.py / trainer/trainer.py / base/base_trainer.py — how that config
  is run: the optimizer is built from the `transformers` module with only `lr` given, no
  lr_scheduler entry means no schedule, `loss.backward(); optimizer.step()` with no clipping,
  no autocast (float32), DataParallel (the config's batch_size is the global batch).
- [F-data] frozen-in-time data_loader/transforms.py — RandomResizedCrop(224, scale=(0.5, 1)).
- [M-cfg] TencentARC/MCQ MILES/configs/zero_msrvtt_4f_i21k_MILES.json — MILES's released config
  (zero-shot, but it carries the same optimizer / trainer block: AdamW lr 3e-5, 100 epochs,
  max_samples_per_epoch 9000), so MILES fine-tuned with Frozen's recipe.
- [HF] transformers defaults of that time: AdamW(lr, betas=(0.9, 0.999), eps=1e-6,
  weight_decay=0.0); DistilBERT config dropout 0.1 (the text model is put in train mode).
- Silent: neither paper nor release gives MSVD / LSMDC / DiDeMo fine-tuning settings; those use
  MSR-VTT's recipe unchanged (marked "papers silent" below).
"""
from miles_jax import config_lib

# dataset -> (what the split is, max caption tokens)
DATASETS = {
    "msrvtt": ("MSR-VTT: train on the 9k train videos, test on the 1k-A (jsfusion) split", 32),
    "msvd": ("MSVD: 1,200 train videos; 670 test videos with multiple captions each", 32),
    "lsmdc": ("LSMDC: 1,000 test clips", 32),
    "didemo": ("DiDeMo: paragraph-to-video (all sentences of a video joined at prepare time)", 64),
}

BATCH = 16  # [F-cfg] data_loader.args.batch_size, global under DataParallel [F-train]
SAMPLES_PER_EPOCH = 9000  # [F-cfg] / [M-cfg] trainer.max_samples_per_epoch
STEPS_PER_EPOCH = SAMPLES_PER_EPOCH // BATCH + 1  # 563: [F-train] total_iterations formula
EPOCHS = 100  # [F-cfg] / [M-cfg] trainer.epochs (upstream also stops early after 10 epochs
#               without a better val loss — not implemented here; the best checkpoint is kept)


def finetune_config(dataset: str, objectives: str = ""):
  """`objectives` '' = contrastive (the papers); 'contrastive,miles' = the appendix MVM ablation."""
  if dataset not in DATASETS:
    raise ValueError(f"unknown fine-tuning dataset {dataset!r}: use {sorted(DATASETS)}")
  c = config_lib.default_config()
  c.model = config_lib.model_config("base")
  c.model.dtype = "float32"  # [F-train] no autocast / amp in training or test scripts
  c.model.text.dropout_rate = 0.1  # [HF] DistilBERT dropout 0.1, text model in train mode
  c.model.video.drop_path_rate = 0.0  # [F-cfg] no drop_path_rate given -> SpaceTimeTransformer 0
  c.objectives = objectives or "contrastive"  # [F-cfg] loss NormSoftmaxLoss only
  c.temperature = 0.05  # frozen-in-time model/loss.py NormSoftmaxLoss(temperature=0.05)
  c.data.train = f"data/{dataset}/train-*.tfrecord"
  c.data.eval = f"data/{dataset}/test-*.tfrecord"
  c.data.tokenizer = "data/bert-base-uncased/vocab.txt"
  c.data.num_frames = 4  # [F-cfg] video_params.num_frames
  c.data.crop_scale = (0.5, 1.0)  # [F-data] RandomResizedCrop scale
  # Upstream tokenizes with padding=True, truncation=True, i.e. cut only at 512 tokens; a fixed
  # padded length is needed here (deviation, docs/faithfulness.md).
  c.data.max_len = DATASETS[dataset][1]  # deviation: see above
  c.data.batch_size = BATCH  # [F-cfg] global batch 16
  c.data.eval_batch_size = 64  # evaluation only: does not change any number
  c.optim.lr = 3e-5  # [F-cfg] / [M-cfg] optimizer.args.lr
  c.optim.schedule = "constant"  # [F-cfg] has no lr_scheduler entry -> none [F-train]
  c.optim.warmup_steps = 0  # [F-train] no warm-up
  c.optim.weight_decay = 0.0  # [HF] transformers.AdamW default
  c.optim.b1, c.optim.b2 = 0.9, 0.999  # [HF] default betas
  c.optim.eps = 1e-6  # [HF] transformers.AdamW default eps
  c.optim.grad_clip = 0.0  # [F-train] no gradient clipping
  c.train.steps = EPOCHS * STEPS_PER_EPOCH  # 56,300: the upstream maximum (see EPOCHS)
  c.train.log_every = 50
  c.train.checkpoint_every = STEPS_PER_EPOCH  # upstream evaluates and saves once per epoch
  c.train.eval_every = STEPS_PER_EPOCH  # [F-train] validation after every epoch
  c.train.best_metric = "retrieval/t2v_R1"  # upstream monitors val loss on the test cut
  return c
