import pytest
import torch

from capsnet.model_export.capsules import DigitCaps
from capsnet.model_export.config import CapsNetConfig
from capsnet.model_export.model import CapsNet, CapsNetOutput, capsnet_loss, margin_loss, reconstruction_loss
from tests.factories import CONV_GAIN, W_GAIN, mnist_test_images

TINY = CapsNetConfig(conv1_channels=16, primary_types=4)


@pytest.mark.parametrize("B", [1, 3])
def test_shapes_lengths_and_coupling(B):
    torch.manual_seed(0)
    model = CapsNet(TINY).eval()
    x = torch.from_numpy(mnist_test_images(B))
    with torch.no_grad():
        model.conv1.weight.mul_(CONV_GAIN)  # numbers big enough to see the routing (tests/factories.py)
        model.primary.conv.weight.mul_(CONV_GAIN)
        model.digits.W.mul_(W_GAIN)
        lengths, poses, coupling = model(x)
    N = TINY.num_primary
    assert lengths.shape == (B, 10) and poses.shape == (B, 10, 16) and coupling.shape == (B, 3, N, 10)
    assert N == 4 * 6 * 6
    for t in (lengths, poses, coupling):
        assert torch.isfinite(t).all()
    assert torch.all(lengths >= 0) and torch.all(lengths < 1)
    torch.testing.assert_close(lengths, poses.norm(dim=-1))
    torch.testing.assert_close(coupling.sum(-1), torch.ones(B, 3, N))
    torch.testing.assert_close(coupling[:, 0], torch.full((B, N, 10), 0.1))
    moved = (coupling[:, 1:] - coupling[:, :-1]).abs().amax(dim=(2, 3))  # (B, r - 1)
    assert moved.min() > 0.01, moved  # each update moved the coupling, far beyond float noise (1e-7)
    assert lengths.min() > 0.1  # capsule lengths of 0.1 to 0.9, not 1e-5
    recon = model.reconstruct(poses, lengths.argmax(1))
    assert recon.shape == (B, 1, 28, 28) and recon.min() >= 0 and recon.max() <= 1


def test_default_config_has_paper_parameter_counts():
    model = CapsNet()
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert total == 8_215_568  # 8.2 M, like the paper
    assert total - decoder == 6_804_224  # 6.8 M without the decoder
    assert model.digits.W.shape == (1152, 10, 16, 8)
    assert model.config.routing_iterations == 3


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = CapsNet(TINY)
    loss, _ = capsnet_loss(model, torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 5, 9]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_margin_loss_values():
    lengths = torch.tensor([[0.95, 0.05, 0.5], [0.2, 0.0, 0.0]])
    targets = torch.tensor([0, 0])
    # image 0: present 0 (0.95 > 0.9), absent: 0.5*(0.5-0.1)^2 = 0.08 ; image 1: (0.9-0.2)^2 = 0.49
    assert margin_loss(lengths, targets).item() == pytest.approx((0.08 + 0.49) / 2)


def test_training_routes_without_the_votes_and_its_gradients_are_the_textbooks(monkeypatch):
    """CapsNet.run routes without forming û (the faster backward pass); every parameter's gradient of
    the training loss equals the one through the textbook form (DigitCaps: û, then Procedure 1)."""
    torch.manual_seed(0)
    model = CapsNet(TINY).double()
    with torch.no_grad():
        model.digits.W.mul_(W_GAIN)  # votes long enough that routing moves the coupling
    x = torch.from_numpy(mnist_test_images(3)).double()
    y = torch.tensor([7, 2, 1])

    def textbook(images: torch.Tensor) -> CapsNetOutput:
        u = model.primary(torch.relu(model.conv1(images)))  # (B, N, 8)
        v, coupling = model.digits(u)  # einsum -> û (B, J, N, D) -> route
        return CapsNetOutput(v.norm(dim=-1), v, coupling, u.norm(dim=-1))

    def no_votes(*args: object) -> None:
        raise AssertionError("CapsNet.run formed the votes")

    grads = []
    for run in (model.run, textbook):
        model.zero_grad()
        with monkeypatch.context() as m:
            if run == model.run:
                m.setattr(DigitCaps, "forward", no_votes)
            out = run(x)
        loss = margin_loss(out.lengths, y) + 0.0005 * reconstruction_loss(model.reconstruct(out.poses, y), x)
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    assert grads[0]["digits.W"].abs().max() > 1e-6  # the routing's weights do get a gradient
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-9, atol=1e-12, msg=name)
