"""Actor offload: shards and optimizer state move and come back unchanged; a no-op off CUDA."""

import torch

from spmd_rlhf.trainer.offload import ActorOffload, move_actor


def _trained_pair():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def test_move_keeps_values_and_leaves_step_counters_alone(monkeypatch):
    model, optimizer = _trained_pair()
    before = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    seen = []
    original_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        seen.append(id(self))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    move_actor(model, optimizer, torch.device("cpu"))
    monkeypatch.undo()
    for state in optimizer.state.values():
        assert id(state["exp_avg"]) in seen and id(state["exp_avg_sq"]) in seen, "moments moved"
        assert id(state["step"]) not in seen, "step counters stay on the host"
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for state, m in zip(optimizer.state.values(), moments):
        assert torch.equal(state["exp_avg"], m) and state["step"].device.type == "cpu"


def test_offload_context_is_a_no_op_off_cuda():
    model, optimizer = _trained_pair()
    offload = ActorOffload(model, optimizer, torch.device("cpu"), enabled=True)
    assert not offload.enabled
    with offload:
        pass
    assert all(p.device.type == "cpu" for p in model.parameters())
