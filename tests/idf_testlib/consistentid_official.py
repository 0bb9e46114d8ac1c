"""ConsistentID's official modules, attention processors and pipeline steps, re-implemented on the
test side from JackAILab/ConsistentID @e234008 (``functions.py``, ``attention.py``,
``pipline_StableDiffusion_ConsistentID.py``): written from that code, independent of IDFusion
(nothing here imports the pack). Sizes are parameters with the official values as defaults, so
small checkpoints in the official layout can be made and run.

What the pipeline does, step by step (SD1.5, LLaVA disabled):

1. ArcFace: ``FaceAnalysis.get(np.array(PIL image))`` (RGB), ``faces[0].normed_embedding``.
2. Parsing: the PIL image resized to 512² (bilinear), ToTensor, ImageNet Normalize, BiSeNet,
   ``out[0]`` argmax → labels; ``masks_for_unique_values`` fills each label's external contours;
   ``key_mask_selection`` keeps Face, the first eye, the first ear, Nose, the first lip.
3. Caption: ``process_text_with_markers``; ``prompt_face = prompt + "Detail:" + caption`` (reordered
   when longer than 77 tokens); ``tokenize_and_mask_noun_phrases_ends`` with ``<|facial|>`` an
   added token; ``prepare_image_token_idx``.
4. Text: ``text_encoder(clean ids)[0]`` (facial branch), ``_encode_prompt`` of the marker-free
   string and the negative (truncated to 77).
5. Images: each mask resized to the photo and composited over black, ``CLIPImageProcessor``,
   CLIP vision ``hidden_states[-2]`` (five slots, zero pixel values for missing ones); the
   unconditional inputs are zero pixel values.
6. ``FacialEncoder`` fuses the facial branch (and the negative, with the unconditional vectors);
   ``ProjPlusModel`` makes the ID tokens; each prompt gets the 4 ID tokens appended.
7. UNet: ``Consistent_AttProcessor`` (attn1) / ``Consistent_IPAttProcessor`` (attn2) on every
   attention of a diffusers UNet, loaded with ``ModuleList(unet.attn_processors.values())``.
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CAPTION = "The person has one face, one nose, two eyes, two ears, and one mouth."
FACIAL_TOKEN = "<|facial|>"
IMAGE_TOKEN = "<|image|>"
KEY_LIST = ["Face", "Left_Ear", "Right_Ear", "Left_Eye", "Right_Eye", "Nose", "Upper_Lip", "Lower_Lip"]
#: ``functions.mapping_table``'s names of the label values the pipeline uses (value → body part).
BODY_PARTS = {1: "Face", 2: "Left_Eyebrow", 3: "Right_Eyebrow", 4: "Left_Eye", 5: "Right_Eye", 6: "Hair",
              7: "Left_Ear", 8: "Right_Ear", 9: "Mouth_External Contour", 10: "Nose", 11: "Mouth_Inner_Contour",
              12: "Upper_Lip", 13: "Lower_Lip", 14: "Neck", 15: "Neck_Inner Contour", 16: "Cloth", 17: "Hat",
              18: "Earring", 19: "Necklace", 20: "Glasses", 21: "Hand", 22: "Wristband", 23: "Clothes_Upper",
              24: "Clothes_Lower"}


# --- functions.py: perceivers and the ID projection -------------------------------------------------

def feed_forward(dim, mult=4):
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


def reshape_tensor(x, heads):
    bs, length, _ = x.shape
    return x.view(bs, length, heads, -1).transpose(1, 2).reshape(bs, heads, length, -1)


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (reshape_tensor(t, self.heads) for t in (q, k, v))
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, length, -1)
        return self.to_out(out)


class FacePerceiverResampler(nn.Module):
    def __init__(self, *, dim=768, depth=4, dim_head=64, heads=16, embedding_dim=1280, output_dim=768, ff_mult=4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                                                   feed_forward(dim, ff_mult)]) for _ in range(depth))

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ProjPlusModel(nn.Module):
    def __init__(self, cross_attention_dim=768, id_embeddings_dim=512, clip_embeddings_dim=1280, num_tokens=4,
                 depth=4):
        super().__init__()
        self.cross_attention_dim, self.num_tokens = cross_attention_dim, num_tokens
        self.proj = nn.Sequential(nn.Linear(id_embeddings_dim, id_embeddings_dim * 2), nn.GELU(),
                                  nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens))
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(dim=cross_attention_dim, depth=depth, dim_head=64,
                                                          heads=cross_attention_dim // 64,
                                                          embedding_dim=clip_embeddings_dim,
                                                          output_dim=cross_attention_dim, ff_mult=4)

    def forward(self, id_embeds, clip_embeds, shortcut=False, scale=1.0):
        x = self.norm(self.proj(id_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim))
        out = self.perceiver_resampler(x, clip_embeds)
        return x + scale * out if shortcut else out


class AttentionMLP(nn.Module):
    def __init__(self, dim=1024, depth=8, dim_head=64, heads=16, single_num_tokens=1, embedding_dim=1280,
                 output_dim=768, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, single_num_tokens, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                                                   feed_forward(dim, ff_mult)]) for _ in range(depth))

    def forward(self, x):
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


# --- attention.py: the fuse module, the FacialEncoder, the processors ---------------------------------

class MLP(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim, use_residual=True):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual
        self.act_fn = nn.GELU()

    def forward(self, x):
        residual = x
        x = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return x + residual if self.use_residual else x


class FuseModule(nn.Module):
    def __init__(self, embed_dim):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse_fn(self, prompt_embeds, id_embeds):
        stacked = self.mlp1(torch.cat([prompt_embeds, id_embeds], dim=-1)) + prompt_embeds
        return self.layer_norm(self.mlp2(stacked))

    def forward(self, prompt_embeds, id_embeds, class_tokens_mask, valid_id_mask):
        id_embeds = id_embeds.to(prompt_embeds.dtype)
        batch_size = id_embeds.shape[0]
        seq_length = prompt_embeds.shape[1]
        flat_id_embeds = id_embeds.view(-1, id_embeds.shape[-2], id_embeds.shape[-1])
        valid_id_embeds = flat_id_embeds[valid_id_mask.flatten()]
        prompt_embeds = prompt_embeds.reshape(-1, prompt_embeds.shape[-1]).clone()
        class_tokens_mask = class_tokens_mask.view(-1)
        valid_id_embeds = valid_id_embeds.view(-1, valid_id_embeds.shape[-1])
        stacked = self.fuse_fn(prompt_embeds[class_tokens_mask], valid_id_embeds)
        assert class_tokens_mask.sum() == stacked.shape[0]
        prompt_embeds.masked_scatter_(class_tokens_mask[:, None], stacked.to(prompt_embeds.dtype))
        return prompt_embeds.view(batch_size, seq_length, -1)


class FacialEncoder(nn.Module):
    def __init__(self, embedding_dim=1280, output_dim=768, embed_dim=768, dim=1024, depth=8):
        super().__init__()
        self.visual_projection = AttentionMLP(dim=dim, depth=depth, heads=dim // 64, embedding_dim=embedding_dim,
                                              output_dim=output_dim)
        self.fuse_module = FuseModule(embed_dim=embed_dim)

    def forward(self, prompt_embeds, multi_image_embeds, class_tokens_mask, valid_id_mask):
        bs, num_inputs, token_length, image_dim = multi_image_embeds.shape
        id_embeds = self.visual_projection(multi_image_embeds.view(bs * num_inputs, token_length, image_dim))
        id_embeds = id_embeds.view(bs, num_inputs, 1, -1)
        return self.fuse_module(prompt_embeds, id_embeds, class_tokens_mask, valid_id_mask)


class LoRALinearLayer(nn.Module):
    """diffusers' LoRALinearLayer without network_alpha: up(down(x))."""

    def __init__(self, in_features, out_features, rank=4):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, hidden_states):
        dtype = self.down.weight.dtype
        return self.up(self.down(hidden_states.to(dtype))).to(hidden_states.dtype)


class Consistent_AttProcessor(nn.Module):
    def __init__(self, hidden_size=None, cross_attention_dim=None, rank=4, lora_scale=1.0):
        super().__init__()
        self.lora_scale = lora_scale
        self.to_q_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRALinearLayer(cross_attention_dim or hidden_size, hidden_size, rank)
        self.to_v_lora = LoRALinearLayer(cross_attention_dim or hidden_size, hidden_size, rank)
        self.to_out_lora = LoRALinearLayer(hidden_size, hidden_size, rank)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = attn.to_q(hidden_states) + self.lora_scale * self.to_q_lora(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key = attn.to_k(encoder_hidden_states) + self.lora_scale * self.to_k_lora(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states) + self.lora_scale * self.to_v_lora(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[0](hidden_states) + self.lora_scale * self.to_out_lora(hidden_states)
        return attn.to_out[1](hidden_states) / attn.rescale_output_factor


class Consistent_IPAttProcessor(nn.Module):
    def __init__(self, hidden_size, cross_attention_dim=None, rank=4, lora_scale=1.0, scale=1.0, num_tokens=4):
        super().__init__()
        self.lora_scale, self.scale, self.num_tokens = lora_scale, scale, num_tokens
        self.to_q_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRALinearLayer(cross_attention_dim or hidden_size, hidden_size, rank)
        self.to_v_lora = LoRALinearLayer(cross_attention_dim or hidden_size, hidden_size, rank)
        self.to_out_lora = LoRALinearLayer(hidden_size, hidden_size, rank)
        self.to_k_ip = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim or hidden_size, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch_size = encoder_hidden_states.shape[0]
        query = attn.to_q(hidden_states) + self.lora_scale * self.to_q_lora(hidden_states)
        end_pos = encoder_hidden_states.shape[1] - self.num_tokens
        encoder_hidden_states, ip_hidden_states = encoder_hidden_states[:, :end_pos], encoder_hidden_states[:, end_pos:]
        key = attn.to_k(encoder_hidden_states) + self.lora_scale * self.to_k_lora(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states) + self.lora_scale * self.to_v_lora(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(t):
            return t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        ip = F.scaled_dot_product_attention(heads(query), heads(self.to_k_ip(ip_hidden_states)),
                                            heads(self.to_v_ip(ip_hidden_states)))
        ip = ip.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = out + self.scale * ip
        hidden_states = attn.to_out[0](hidden_states) + self.lora_scale * self.to_out_lora(hidden_states)
        return attn.to_out[1](hidden_states) / attn.rescale_output_factor


def processor_hidden_sizes(names, block_out_channels) -> list[int]:
    """``set_ip_adapter``'s hidden size per processor name."""
    sizes = []
    for name in names:
        if name.startswith("mid_block"):
            sizes.append(block_out_channels[-1])
        elif name.startswith("up_blocks"):
            sizes.append(list(reversed(block_out_channels))[int(name[len("up_blocks.")])])
        else:
            sizes.append(block_out_channels[int(name[len("down_blocks.")])])
    return sizes


def adapter_modules(names, block_out_channels, cross_attention_dim, rank) -> nn.ModuleList:
    """The processors in ``unet.attn_processors`` order, as ``set_ip_adapter`` makes them."""
    processors = []
    for name, hidden in zip(names, processor_hidden_sizes(names, block_out_channels)):
        if name.endswith("attn1.processor"):
            processors.append(Consistent_AttProcessor(hidden, None, rank))
        else:
            processors.append(Consistent_IPAttProcessor(hidden, cross_attention_dim, rank))
    return nn.ModuleList(processors)


# --- functions.py: captions, tokens, masks --------------------------------------------------------------

def remove_duplicate_keywords(text, keywords):
    keyword_counts = {}
    words = re.findall(r'\b\w+\b|[.,;!?]', text)
    for keyword in keywords:
        keyword_counts[keyword] = 0
        for i, word in enumerate(words):
            if word.lower() == keyword.lower():
                keyword_counts[keyword] += 1
                if keyword_counts[keyword] > 1:
                    words[i] = ""
    return " ".join(words)


def process_text_with_markers(text, parsing_mask_list):
    """``(caption with <|facial|> markers, the mask dict)`` as the official function rewrites them."""
    keywords = ["face", "ears", "eyes", "nose", "mouth"]
    text = remove_duplicate_keywords(text, keywords)
    mapping = {"Face": "face", "Left_Ear": "ears", "Right_Ear": "ears", "Left_Eye": "eyes", "Right_Eye": "eyes",
               "Nose": "nose", "Upper_Lip": "mouth", "Lower_Lip": "mouth"}
    features, markers = [], []
    for key in KEY_LIST:
        if key in parsing_mask_list:
            mapped = mapping.get(key, key.lower())
            if mapped not in features:
                features.append(mapped)
                markers.append("<|" + mapped + "|>")
    text_marked = text
    for feature, marker in zip(features[::-1], markers[::-1]):
        new = re.sub(rf'\b{feature}\b', f'{feature} {marker}', text_marked, count=1)
        if new == text_marked:
            for key, value in mapping.items():
                if value == feature and key in parsing_mask_list:
                    del parsing_mask_list[key]
        text_marked = new
    text_marked = text_marked.replace('\n', '')
    ordered = []
    for marker in markers:
        start = text_marked.find(marker)
        end = start + len(marker)
        while start > 0 and text_marked[start - 1] not in [",", ".", ";"]:
            start -= 1
        while end < len(text_marked) and text_marked[end] not in [",", ".", ";"]:
            end += 1
        context = text_marked[start:end].strip()
        if context:
            ordered.append(context + ",")
            text_marked = text_marked[:start] + text_marked[end:]
    aligned = " ".join(ordered)
    for item in ["<|face|>", "<|ears|>", "<|nose|>", "<|eyes|>", "<|mouth|>"]:
        aligned = aligned.replace(item, FACIAL_TOKEN)
    return aligned, parsing_mask_list


def tokenize_and_mask_noun_phrases_ends(text, facial_token_id, tokenizer):
    input_ids = tokenizer.encode(text)
    mask = [False for _ in input_ids]
    clean = []
    for token in input_ids:
        if token == facial_token_id:
            mask[len(clean) - 1] = True
        else:
            clean.append(token)
    max_len = tokenizer.model_max_length
    clean = clean[:max_len] if len(clean) > max_len else clean + [tokenizer.pad_token_id] * (max_len - len(clean))
    mask = mask[:max_len] if len(mask) > max_len else mask + [False] * (max_len - len(mask))
    return torch.tensor(clean)[None], torch.tensor(mask)[None]


def prepare_facial_token_idx(facial_token_mask, max_num_facials=5):
    idx = torch.nonzero(facial_token_mask, as_tuple=True)[1]
    valid = torch.ones_like(idx, dtype=torch.bool)
    if len(idx) < max_num_facials:
        valid = torch.cat([valid, torch.zeros(max_num_facials - len(valid), dtype=torch.bool)])
    return valid[None]


def encode_prompt_with_trigger_word(prompt, face_caption, key_parsing_mask_list, tokenizer):
    """(prompt_text_only, clean ids [1, 77], aligned masks, facial token mask [1, 77], valid mask [1, 5])."""
    caption, masks = process_text_with_markers(face_caption, key_parsing_mask_list)
    prompt_face = prompt + "Detail:" + caption
    length = len(tokenizer(prompt_face, max_length=tokenizer.model_max_length, padding="max_length",
                           truncation=False).input_ids)
    if length != 77:
        prompt_face = "Detail:" + caption + " Caption:" + prompt
    text_only = prompt_face.replace(FACIAL_TOKEN, "").replace(IMAGE_TOKEN, "")
    clean, mask = tokenize_and_mask_noun_phrases_ends(prompt_face, tokenizer.convert_tokens_to_ids(FACIAL_TOKEN),
                                                      tokenizer)
    return text_only, clean, masks, mask, prepare_facial_token_idx(mask)


def masks_for_unique_values(labels):
    import cv2
    from PIL import Image
    masks = {}
    for value in np.unique(labels):
        binary = np.uint8(labels == value) * 255
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        mask = np.zeros_like(labels)
        for contour in contours:
            cv2.drawContours(mask, [contour], -1, (255), thickness=cv2.FILLED)
        if value == 0:
            masks["WithoutBackground"] = Image.fromarray(np.where(mask == 255, 0, 255).astype(mask.dtype))
        part = BODY_PARTS.get(int(value), f"Unknown_{value}")
        if not part.startswith("Unknown_"):
            masks[part] = Image.fromarray(mask)
    return masks


def key_mask_selection(parsing_mask_list):
    """``get_prepare_facemask``'s choice: Face, the first eye, the first ear, Nose, the first lip."""
    selected, processed = {}, set()
    for key, mask in parsing_mask_list.items():
        if key in KEY_LIST:
            if "_" in key:
                prefix = key.split("_")[1]
                if prefix in processed:
                    continue
                selected[key] = mask
                processed.add(prefix)
            selected[key] = mask
    return selected


def parse(bisenet, image):
    """Labels [512, 512] of a PIL image (``parsing_face_mask``)."""
    from torchvision import transforms
    to_tensor = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    from PIL import Image
    x = to_tensor(image.resize((512, 512), Image.BILINEAR))[None].float()
    with torch.no_grad():
        out = bisenet(x)[0]
    return out.squeeze(0).cpu().numpy().argmax(0).astype(np.uint8)


def fetch_mask_raw_image(raw_image, mask_image):
    from PIL import Image
    mask_image = mask_image.resize(raw_image.size)
    return Image.composite(raw_image, Image.new('RGB', raw_image.size, (0, 0, 0)), mask_image)


def facial_clip_images(image, key_parsing_mask_list, max_num_facials=5):
    """[5, 3, 224, 224]: each region's CLIPImageProcessor pixels, zero pixels for missing slots."""
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor()
    images = [processor(images=fetch_mask_raw_image(image, key_parsing_mask_list[k]), return_tensors="pt").pixel_values
              for k in key_parsing_mask_list]
    images += [torch.zeros(1, 3, 224, 224) for _ in range(max_num_facials - len(images))]
    return torch.cat(images)
