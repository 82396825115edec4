"""The training engine behind train_imagenet.py, one job per module.

Imports point one way: train_imagenet.py -> engine -> resnet, data; resnet/ and data/ never import it.
Inside, the modules lower in this list import only from those above them:

    console      every console line (and data/'s log records) goes out here
    faults       the test-only fault-injection hooks, read from the environment once
    options      every option declared once (type, default, bound, help), in one group per part of the engine
    config       the parser, the recipe reader and the checks, all made from those declarations
    runtime      SLURM ranks, the Accelerator, the one collective (any_rank), run info
    checkpoints  atomic, checksummed checkpoints; resume; what a failed write says
    stops        stop reasons, signals, the NaN/inf guard, the agreement to stop
    batches      the loaders of this rank (or synthetic batches), uint8 -> normalised device tensors
    recipe       network, optimizer, LR schedule, EMA, loss
    monitor      TensorBoard, metrics.jsonl, the interval line, progress bar, the data-wait warning
    evaluation   exact evaluation, BatchNorm sync, replica check, export, weights for --evaluate
    trainer      the loop: fit, one epoch, after a step, evaluate, save, finish
"""
