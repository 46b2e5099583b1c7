"""The kit's machinery and tools; the recipe a competitor edits stays at the top level (train.py, inference.py,
dataset.py, model.py, loss.py). Tools run from the checkout as `python -m kit.<tool> --help`.

Machinery (imported by the recipe files):
  common       one-line errors (UserError, run_main), atomic writes, name lookups, argument checks (KitParser)
  options      argument groups shared by commands (data, speed), parsed before any heavy import
  labels       the mask layout's label grid: 18 = mask 3 x gender 2 x age group 3 (make_label, split_label)
  images       image decoding, crops (face boxes, centre share), unreadable files, ImageDataset
  tables       CSVs with one-line errors, the test table (info.csv / sample submission), pseudo-label rows
  device       device and precision (pick_device, amp_dtype, autocast)
  checkpoints  torch.load with one-line errors, atomic saves, the check that a checkpoint is the run's
  runs         the run folder: config.json, folds.csv, fold outputs, log.csv, oof.csv, metrics.json
  metrics      macro F1 and the other scores of metrics.json
  predict      a run's fold models (load_run) and their averaged probabilities (predict_files, predict_probs),
               the frozen trunk of a --freeze_blocks run's folds run once for all of them
  pseudo       pseudo-labels of the test images for each fold, from the teacher run's model of that fold
  finish       the end of a run: oof.csv, metrics.json, decision.json, people.json, report.html
  speed        decoded-image cache, loader workers, seeded per-image augmentation, feature cache
  distributed  torchrun (DDP) and --fold_per_device
  decision     the macro-F1 decision layer fitted on OOF (also a tool)
  people       person-consistent answers: test pictures grouped into people, gender and age pooled (also a tool)

Tools (python -m kit.<name> --help): report, label_issues, compare, decision, people, sweep (Optuna search), app
(demo page; --review: the label review of kit/review.py), gradcam, export, crop_faces, weights, doctor, bench.

Imports run one way, from the recipe files into this package. The package imports from the recipe files only
this contract, so a competitor who rewrites them keeps these names (tests/test_layout.py checks it):
  model.create_model(name, num_classes, head, pretrained, weights)   rebuilds a run's models (kit.predict)
  model.to_probs(logits, head)                                       their class probabilities
  dataset.build_transform(augmentation, input_size, interpolation, train)   the evaluation resize
  dataset.build_table(data_dir, layout, ...)                         a training folder's images (crop_faces, bench)
  train: build_parser, parse_args, run_settings, build_fold, make_loader, train_one_epoch, seed_everything, OPTIMIZERS
                                                   its settings (kit.sweep) and loop, timed as they are by kit.bench
kit.distributed runs the training script whose path train.py hands it (its own file, whatever its name).
"""
