import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0,'.')
from tmdiff.kernels import attention as A
b,t,h,kh,d=2,1024,8,2,128
ks=jax.random.split(jax.random.key(1),4)
q=jax.random.normal(ks[0],(b,t,h,d),jnp.bfloat16);k=jax.random.normal(ks[1],(b,t,kh,d),jnp.bfloat16);v=jax.random.normal(ks[2],(b,t,kh,d),jnp.bfloat16)
ct=jax.random.normal(ks[3],q.shape)
for name,segnp in [('pad',None),('nopad',None)]:
  seg=np.ones((b,t),np.int32); seg[0,300:700]=2; seg[0,700:1000]=3
  if name=='pad': seg[0,1000:]=0; seg[1,512:]=0
  else: seg[0,1000:]=4; seg[1,512:]=2
  seg=jnp.asarray(seg)
  for impl in ['cudnn','pallas_gpu']:
    g=jax.jit(jax.grad(lambda q,k,v: jnp.sum(A.attend(q,k,v,seg,impl=impl).astype(jnp.float32)*ct),(0,1,2)))(q,k,v)
    for nm,x in zip('qkv',g):
      bad=~jnp.isfinite(x.astype(jnp.float32)).all(axis=(2,3))
      print(name,impl,'d'+nm,'nonfinite rows per batch:',[np.nonzero(np.asarray(bad[i]))[0][:5].tolist()+[int(bad[i].sum())] for i in range(b)])
