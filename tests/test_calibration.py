"""The calibration loss on hand-made probabilities, checked against direct arithmetic."""
import numpy as np
import pytest
import torch

from pipeline.finetuning.loss import calibration_objective, calibration_terms


def test_terms_on_hand_made_probabilities():
    # image 0: two samples, both confident in the true class 1 -> recoverable
    # image 1: samples disagree (class 0 and class 2), true label 1 -> not recoverable
    probs = torch.tensor(
        [
            [[0.1, 0.8, 0.1], [0.0, 1.0, 0.0]],
            [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
        ]
    )
    labels = torch.tensor([1, 1])
    t = calibration_terms(probs, labels)
    brier0 = ((0.1**2 + 0.2**2 + 0.1**2) + 0.0) / 2
    brier1 = ((1 + 1 + 0) + (0 + 1 + 1)) / 2
    np.testing.assert_allclose(t.brier.numpy(), [brier0, brier1], rtol=1e-6)
    qbar0 = np.array([0.05, 0.9, 0.05])
    qbar1 = np.array([0.5, 0.0, 0.5])
    np.testing.assert_allclose(t.collision.numpy(), [(qbar0**2).sum(), (qbar1**2).sum()], rtol=1e-6)
    np.testing.assert_array_equal(t.recoverable.numpy(), [1.0, 0.0])
    np.testing.assert_allclose(t.top_frequency.numpy(), [1.0, 0.5])
    lam = 0.3
    obj = calibration_objective(t, lam)
    np.testing.assert_allclose(obj.numpy(), [brier0, lam * (qbar1**2).sum()], rtol=1e-6)


def test_gradients_push_the_right_way():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([2])  # q_bar's argmax is 0 or 1, never 2: unrecoverable -> diversify
    t = calibration_terms(logits.softmax(-1), labels)
    assert t.recoverable.item() == 0.0
    calibration_objective(t, lam=1.0).sum().backward()
    # diversity: lowering the collision probability moves mass toward the unused class 2
    assert logits.grad[0, :, 2].lt(0).all()  # gradient descent raises class-2 logits


def test_rejects_single_sample():
    with pytest.raises(ValueError, match="m >= 2"):
        calibration_terms(torch.ones(2, 1, 3) / 3, torch.tensor([0, 1]))


# ---------------------------------------------------------------- the diffusion term and the full batch loss

from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402

from pipeline.diffusion import NoiseSchedule  # noqa: E402
from pipeline.finetuning.loss import batch_loss, denoising_mse, holdout_statistics, sample_probs  # noqa: E402
from pipeline.models.classifier import Classifier  # noqa: E402
from pipeline.models.denoiser import Denoiser  # noqa: E402
from pipeline.models.factory import DenoiseAndClassify  # noqa: E402


def tiny_denoiser(out_channels=3, **schedule) -> Denoiser:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, out_channels=out_channels, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    return Denoiser(unet, NoiseSchedule(**{"beta_schedule": "linear", "num_train_timesteps": 1000, **schedule}))


@pytest.mark.parametrize("out_channels,schedule", [
    (3, {"prediction_type": "epsilon"}),
    (3, {"prediction_type": "v_prediction"}),
    (3, {"prediction_type": "sample"}),
    (6, {"prediction_type": "epsilon", "num_train_timesteps": 500, "rescale_timesteps": True}),
])
def test_denoising_mse_matches_diffusers_forward_process(out_channels, schedule):
    denoiser = tiny_denoiser(out_channels, **schedule)
    x01 = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = denoising_mse(denoiser, x01, torch.Generator().manual_seed(7))

    # independent: the same draws (t, then eps), diffusers' own forward process and targets
    s = denoiser.schedule
    sched = DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                          beta_schedule="linear", prediction_type=s.prediction_type)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, s.num_train_timesteps, (3,), generator=g)
    eps = torch.randn(x01.shape, generator=g)
    x0 = x01 * 2 - 1
    x_t = sched.add_noise(x0, eps, t)
    model_t = t.float() * (1000 / s.num_train_timesteps if s.rescale_timesteps else 1)
    with torch.no_grad():
        out = denoiser.unet(x_t, model_t).sample[:, :3]
    target = {"epsilon": eps, "v_prediction": sched.get_velocity(x0, eps, t), "sample": x0}[s.prediction_type]
    want = ((out - target) ** 2).mean(dim=(1, 2, 3))
    np.testing.assert_allclose(got.detach().numpy(), want.numpy(), rtol=2e-4, atol=1e-6)


def tiny_model() -> DenoiseAndClassify:
    import timm

    torch.manual_seed(0)
    clf = Classifier(timm.create_model("test_resnet", num_classes=4), 4, (8, 8), (0.5,) * 3, (0.5,) * 3)
    return DenoiseAndClassify(tiny_denoiser(), clf.eval())


def test_sample_probs_are_the_pipeline_on_each_noisy_copy():
    model, x01 = tiny_model(), torch.rand(2, 3, 8, 8)
    sigmas = torch.tensor([0.25, 0.5])
    probs = sample_probs(model, x01, sigmas, 3, torch.Generator().manual_seed(3))
    assert probs.shape == (2, 2, 3, 4)
    eps = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(3)).view(2, 2, 3, 3, 8, 8)
    with torch.no_grad():
        for si, s in enumerate(sigmas):
            for b in range(2):
                for i in range(3):
                    want = model(x01[b:b + 1] + s * eps[si, b, i][None], s).softmax(-1)[0]
                    np.testing.assert_allclose(probs[si, b, i].detach().numpy(), want.numpy(), rtol=1e-4, atol=1e-6)


def test_batch_loss_is_calibration_mean_plus_mu_mse():
    model, x01, labels = tiny_model(), torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])
    sigmas, lam, mu = torch.tensor([0.25, 0.5]), 0.7, 0.3
    out = batch_loss(model, x01, labels, sigmas, 2, lam, mu, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    probs = sample_probs(model, x01, sigmas, 2, g)
    mse = denoising_mse(model.denoiser, x01, g).mean()
    per_image = torch.stack([calibration_objective(calibration_terms(p, labels), lam) for p in probs])
    np.testing.assert_allclose(out.loss.item(), (per_image.mean() + mu * mse).item(), rtol=1e-5)
    recoverable = torch.stack([calibration_terms(p, labels).recoverable for p in probs])
    np.testing.assert_allclose(out.per_sigma["recoverable"].numpy(), recoverable.mean(1).numpy())
    # the statistics are sums that add up over batches
    sums = holdout_statistics(model, x01, labels, sigmas, 2, torch.Generator().manual_seed(5))
    np.testing.assert_allclose(sums[:, 0] + sums[:, 2], [3.0, 3.0])
    freq = torch.stack([calibration_terms(p, labels).top_frequency for p in probs])
    np.testing.assert_allclose(sums[:, 1] + sums[:, 3], freq.sum(1).detach().numpy(), rtol=1e-6)
