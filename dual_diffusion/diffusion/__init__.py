"""The math of D-DiT, independent of any network (see README.md in this folder).

flow            image: rectified flow (timesteps, noising, velocity target, loss, caption dropout)
masked          text: absorbing-state diffusion (schedules, antithetic times, masking, SUBS loss)
image_sampling  flow-ODE samplers (Euler / Heun, SD3 shift, CFG, in-painting)
text_sampling   masked-diffusion samplers (ancestral with caching, confidence, semi-AR)
"""
from dual_diffusion.diffusion import flow, image_sampling, masked, text_sampling
from dual_diffusion.diffusion.flow import add_noise, drop_captions, flow_loss, sample_timesteps, velocity_target
from dual_diffusion.diffusion.image_sampling import resolution_shift, sample_images, time_grid
from dual_diffusion.diffusion.masked import Schedule, antithetic_times, mask_tokens, masked_diffusion_loss
from dual_diffusion.diffusion.text_sampling import sample_text

__all__ = ["flow", "masked", "image_sampling", "text_sampling", "sample_timesteps", "add_noise",
           "velocity_target", "flow_loss", "drop_captions", "Schedule", "antithetic_times", "mask_tokens",
           "masked_diffusion_loss", "sample_images", "time_grid", "resolution_shift", "sample_text"]
