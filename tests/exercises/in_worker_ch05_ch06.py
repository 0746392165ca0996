"""Helpers that run inside the sandboxed worker for the graded tests of chapters 05 and 06, as
`tests/exercises/in_worker.py`'s do: each gets the student's module (`ex`) and returns plain data,
never a verdict; the trusted test computes its reference itself and compares."""

import torch

from minillm.model import GPT, GPTConfig


def _randint(high, *shape, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# -- chapter 05 --------------------------------------------------------------------------------


def evaluate_in_worker(ex, model, batches, training):
    """In the worker: `ex.evaluate` on `model` (put in train mode `training` first), recording
    at every forward call whether gradients were enabled and whether any module was in train
    mode; and the model's mode afterwards."""
    calls = []

    def record(module, args):
        calls.append((torch.is_grad_enabled(), any(m.training for m in module.modules())))

    model.train(training)
    model.register_forward_pre_hook(record)
    loss = ex.evaluate(model, batches)
    return loss, calls, model.training


def resume_problem():
    """A small GPT, its AdamW, and 10 fixed batches: one per step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    batches = [(_randint(11, 4, 8, seed=s), _randint(11, 4, 8, seed=100 + s)) for s in range(10)]
    return model, optimizer, batches


def train_on(model, optimizer, batches):
    for x, y in batches:
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def resume_in_worker(ex, stop):
    """In the worker: train `stop` steps, save with ex.save_checkpoint, build a fresh model and
    optimizer (other initial weights, as a new process would), load with ex.load_checkpoint and
    train the remaining steps from the step it returns. The final weights and that step."""
    model, optimizer, batches = resume_problem()
    train_on(model, optimizer, batches[:stop])
    ex.save_checkpoint("checkpoint.pt", model, optimizer, stop)
    torch.manual_seed(1)  # a fresh start: other initial weights than the interrupted run's
    fresh = GPT(model.config)
    fresh_optimizer = torch.optim.AdamW(
        fresh.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1
    )
    step = ex.load_checkpoint("checkpoint.pt", fresh, fresh_optimizer)
    train_on(fresh, fresh_optimizer, batches[step:] if isinstance(step, int) else [])
    return step, {k: v.detach().clone() for k, v in fresh.state_dict().items()}


# -- chapter 06 --------------------------------------------------------------------------------


def checkpoint_blocks():
    """Three course blocks with dropout, in train mode, and an input that requires a gradient."""
    from minillm.model import Block

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(32, 4, dropout=0.1) for _ in range(3)).double()
    x = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)
    return blocks, x


def saved_bytes(forward):
    """Bytes of the distinct storages autograd saves while `forward()` runs, parameters left out,
    and forward's result."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return storages, out


def checkpointed_in_worker(ex):
    """In the worker: ex.checkpointed_forward on `checkpoint_blocks()` (random state seeded as the
    trusted plain run seeds it), then backward of the output's sum of squares. The output, the
    gradients of the input and of every parameter, and the bytes saved for backward."""
    blocks, x = checkpoint_blocks()
    params = {p.untyped_storage().data_ptr() for p in blocks.parameters()}
    torch.manual_seed(1)
    storages, out = saved_bytes(lambda: ex.checkpointed_forward(blocks, x))
    out.pow(2).sum().backward()
    saved = sum(n for ptr, n in storages.items() if ptr not in params)
    return out.detach(), x.grad, [p.grad for p in blocks.parameters()], saved
