"""One-command demo: ``python -m open_clip_spiking.demo``.

It distils the spiking student ``spikeclip-vit-t-28`` from the offline teacher ``lit-effnetlite0-minilm``
on Fashion-MNIST and reports what the student keeps of the teacher's accuracy at what energy:

1. data: Fashion-MNIST, read from the Debian package ``dataset-fashion-mnist`` or downloaded by
   torchvision, written once to WebDataset shards in the clip_benchmark layout (``fashion_mnist``);
2. teacher: the offline teacher, whose projections are trained on the training split with prompts
   built from the class names, cached after the first build;
3. align, align-text and finetune: the three student stages of ``python -m open_clip_spiking.train``;
4. clip_benchmark zero-shot classification of the teacher, the student after align-text and the
   fine-tuned student, then ``python -m open_clip_spiking.energy`` on the fine-tuned student and the
   teacher.

The output folder receives the stage checkpoints, ``results.json`` (every figure with the command that
produced it), ``summary.png``, ``training.png``, the energy report and ``demo.log``. ``--data-dir``
runs the same stages on other shards in the clip_benchmark layout, and ``--teacher`` with
``--teacher-pretrained`` on another open_clip teacher. ``open_clip_spiking.demo.cli.main`` runs it from
Python, and ``python -m open_clip_spiking.demo.fashion_mnist`` writes the shards alone.
"""
