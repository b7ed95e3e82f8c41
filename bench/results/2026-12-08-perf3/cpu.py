import os,sys,time,collections
pids=[int(p) for p in sys.argv[2:]]; dur=float(sys.argv[1])
def snap():
    d={}
    for p in pids:
        try:
            for t in os.listdir(f'/proc/{p}/task'):
                s=open(f'/proc/{p}/task/{t}/stat').read()
                name=s[s.index('(')+1:s.rindex(')')]
                f=s[s.rindex(')')+2:].split()
                d[(p,int(t),name)]=int(f[11])+int(f[12])
        except FileNotFoundError: pass
    st=open('/proc/stat').readline().split()[1:]
    return d,[int(x) for x in st]
a,sa=snap(); time.sleep(dur); b,sb=snap()
hz=os.sysconf('SC_CLK_TCK')
agg=collections.defaultdict(float)
for k,v in b.items():
    dv=(v-a.get(k,0))/hz/dur*100
    name=k[2]
    import re
    name=re.sub(r'\d+$','N',name) if not name.startswith('peer') else name
    agg[(k[0],name)]+=dv
tot=collections.defaultdict(float)
for (p,n),v in sorted(agg.items()):
    tot[p]+=v
for (p,n),v in sorted(agg.items(), key=lambda x:(x[0][0],-x[1])):
    if v>=1: print(f'{p} {n:20s} {v:6.1f}%')
for p,v in tot.items(): print(p,'total',round(v,1))
d=[y-x for x,y in zip(sa,sb)]; T=sum(d)
print('machine: user %.0f%% sys %.0f%% idle %.0f%% iowait %.0f%% softirq %.0f%% steal %.0f%% (of 200%%)'%tuple(200*d[i]/T for i in (0,2,3,4,6,7)))
